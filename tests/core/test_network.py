"""Networks on plain torch models: apply/restore, merge/unmerge, multiplier, stacking, presets, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lyco_core as lc
from lyco_core.errors import InvalidConfigError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(self.norm(x))))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(dim=(2, 3)))


def _randomise(net: lc.AdapterNetwork) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)


@pytest.fixture
def model() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def test_apply_restore_is_exact(model: Toy) -> None:
    x = torch.randn(2, 8, 6, 6)
    y0 = model(x)
    net = lc.create_network(model, algo="lora", dim=2)
    assert len(net) == 3
    _randomise(net)
    net.apply()
    assert not torch.allclose(model(x), y0)
    net.restore()
    assert torch.equal(model(x), y0)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "full", "glora", "ia3", "diag-oft"])
def test_merge_equals_forward_and_unmerge_restores(model: Toy, algo: str) -> None:
    x = torch.randn(2, 8, 6, 6)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    net = lc.create_network(model, algo=algo, dim=2, alpha=1.0)
    _randomise(net)
    net.set_multiplier(0.7)
    net.apply()
    y_adapter = model(x)
    net.restore()
    net.merge()
    y_merged = model(x)
    torch.testing.assert_close(y_merged, y_adapter, rtol=1e-5, atol=1e-5)
    net.unmerge()
    for n, p in model.named_parameters():
        assert torch.equal(p, w0[n]), n


def test_multiplier_zero_is_the_base_model(model: Toy) -> None:
    x = torch.randn(2, 8, 6, 6)
    y0 = model(x)
    net = lc.create_network(model, algo="lora", dim=2, dora=True)
    _randomise(net)
    net.apply()
    net.set_multiplier(0.0)
    torch.testing.assert_close(model(x), y0, rtol=1e-6, atol=1e-6)


def test_two_networks_stack_and_restore_in_any_order(model: Toy) -> None:
    x = torch.randn(2, 8, 6, 6)
    y0 = model(x)
    a = lc.create_network(model, algo="lora", dim=2)
    b = lc.create_network(model, algo="loha", dim=2)
    _randomise(a)
    _randomise(b)
    a.apply()
    ya = model(x)
    b.apply()
    yab = model(x)
    a.restore()
    yb = model(x)
    b.restore()
    assert torch.equal(model(x), y0)
    assert not torch.allclose(yab, ya)
    assert not torch.allclose(yab, yb)


def test_stacked_additive_adapters_sum_on_one_layer() -> None:
    layer = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    y0 = layer(x)
    a = lc.create_network(layer, algo="lora", dim=2)
    b = lc.create_network(layer, algo="lokr", dim=2, factor=2)
    _randomise(a)
    _randomise(b)
    a.apply()
    ya = layer(x)
    b.apply()
    yab = layer(x)
    a.restore()
    yb = layer(x)
    torch.testing.assert_close(yab - y0, (ya - y0) + (yb - y0), rtol=1e-4, atol=1e-5)


def test_only_adapter_parameters_train(model: Toy) -> None:
    net = lc.create_network(model, algo="lokr", dim=4, factor=2)
    for p in model.parameters():
        p.requires_grad_(False)
    net.apply()
    opt = torch.optim.Adam(net.trainable_parameters(), lr=0.05)
    x, target = torch.randn(4, 8, 6, 6), torch.randn(4, 6)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    assert all(p.grad is None for p in model.parameters())


def test_preset_that_matches_nothing_is_an_error(model: Toy) -> None:
    with pytest.raises(InvalidConfigError, match="matched no module"):
        lc.create_network(model, preset={"default": {"target_name": ["nothing.here"]}})


def test_unknown_preset_key_is_named(tmp_path: Path, model: Toy) -> None:
    p = tmp_path / "mine.toml"
    p.write_text('[default]\ntarget_module = ["Linear"]\ntarget_nmae = ["x"]\n')
    with pytest.raises(InvalidConfigError, match="target_nmae"):
        lc.create_network(model, preset=str(p))


def test_unknown_option_is_named(model: Toy) -> None:
    with pytest.raises(InvalidConfigError, match="factr"):
        lc.create_network(model, algo="lokr", factr=4)
    with pytest.raises(InvalidConfigError, match="algo"):
        lc.create_network(model, algo="lorax")


def test_overrides_and_excludes(model: Toy) -> None:
    preset = {
        "default": {"target_module": ["Linear", "Conv2d"], "exclude_name": ["block.proj"]},
        "override": [{"name": "head", "options": {"algo": "loha", "dim": 3}}],
    }
    net = lc.create_network(model, preset=preset, algo="lora", dim=2)
    algos = {m.key: m.algorithm.name for m in net}
    assert algos == {"lycoris_block_conv": "lora", "lycoris_head": "loha"}


def test_conv_dim_zero_skips_kxk_convs(model: Toy) -> None:
    net = lc.create_network(model, algo="lora", dim=2, conv_dim=0)
    assert sorted(m.key for m in net) == ["lycoris_block_proj", "lycoris_head"]


def test_train_norm_adds_norm_modules(model: Toy) -> None:
    preset = {"train_norm": True, "default": {"target_module": ["Block"]}}
    net = lc.create_network(model, preset=preset, algo="lora", dim=2)
    assert net.summary() == {"lora": 2, "norm": 1}
    _randomise(net)
    x = torch.randn(2, 8, 6, 6)
    net.apply()
    y = model(x)
    net.restore()
    net.merge()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def _linear_net(**opts: object) -> tuple[nn.Linear, lc.AdapterNetwork]:
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    layer.requires_grad_(False)
    net = lc.create_network(layer, dim=4, **opts)
    _randomise(net)
    net.apply()
    return layer, net


def test_module_dropout_skips_the_adapter_only_in_training() -> None:
    layer, net = _linear_net(algo="lora", module_dropout=0.999999)
    x = torch.randn(4, 16)
    with torch.no_grad():
        net.train()
        y_train = layer(x)
        net.eval()
        y_eval = layer(x)
        net.restore()
        y_base = layer(x)
    torch.testing.assert_close(y_train, y_base)
    assert not torch.allclose(y_eval, y_base)


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_rank_dropout_and_dropout_act_in_training_only(algo: str) -> None:
    for opts in ({"rank_dropout": 0.5}, {"dropout": 0.5}, {"rank_dropout": 0.5, "rank_dropout_scale": True}):
        layer, net = _linear_net(algo=algo, **opts)
        x = torch.randn(64, 16)
        net.eval()
        y1, y2 = layer(x), layer(x)
        torch.testing.assert_close(y1, y2)
        net.train()
        torch.manual_seed(1)
        t1 = layer(x)
        torch.manual_seed(2)
        t2 = layer(x)
        assert not torch.allclose(t1, t2), opts


def test_use_scalar_starts_at_zero_and_is_folded_on_save(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    x = torch.randn(4, 16)
    y0 = layer(x)
    net = lc.create_network(layer, algo="lokr", dim=2, factor=4, decompose_both=True, use_scalar=True)
    net.apply()
    torch.testing.assert_close(layer(x), y0)  # ΔW = 0 at init although every factor is random
    with torch.no_grad():
        next(iter(net)).scalar.fill_(0.7)
    y = layer(x)
    assert not torch.allclose(y, y0)
    path = tmp_path / "s.safetensors"
    net.save(path)
    fresh = nn.Linear(16, 16)
    fresh.load_state_dict(layer.state_dict())
    net2, _ = lc.load_network(path, fresh)
    net2.apply()
    torch.testing.assert_close(fresh(x), y)


def test_network_apply_with_a_function_is_torch_apply(model: Toy) -> None:
    net = lc.create_network(model, algo="lora", dim=2)
    seen: list[str] = []
    net.apply(lambda m: seen.append(type(m).__name__))
    assert not net.applied  # torch's apply(fn) does not attach the adapters
    assert seen.count("AdapterModule") == len(net)
    net.apply()
    assert net.applied
