"""DyLoRA against LyCORIS 4.1.3 ``DyLoraModule``: file layout, alpha convention, truncation, training helpers."""

from __future__ import annotations

import random

import pytest
import torch
from checks import rel_err
from lycoris.modules import DyLoraModule
from torch import nn

from lyco_core.algorithms import detect, get
from lyco_core.algorithms.base import AdapterOptions
from lyco_core.algorithms.dylora import DyLoRA, dylora_step_factors, dylora_truncate, sample_rank_blocks
from lyco_core.algorithms.lora import LoRA, lora_delta
from lyco_core.errors import CorruptFileError, IncompatibleBaseError, InvalidConfigError
from lyco_core.layers import LayerInfo

ALGO = DyLoRA()
R, BS = 8, 4  # two rank blocks


def _layer(kind: str) -> nn.Module:
    return {
        "linear": lambda: nn.Linear(6, 5),
        "conv3x3": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
        "conv1x1": lambda: nn.Conv2d(4, 6, 1),
        "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1),
    }[kind]().double()


def _input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 2, layer.in_features, dtype=torch.float64)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, layer.in_channels, 9, dtype=torch.float64)
    return torch.randn(2, layer.in_channels, 7, 7, dtype=torch.float64)


def _lycoris(layer: nn.Module, alpha: float, mult: float = 1.0) -> DyLoraModule:
    ref = DyLoraModule("k", layer, multiplier=mult, lora_dim=R, alpha=alpha, block_size=BS).double()
    with torch.no_grad():
        for p in ref.up_list:
            p.normal_()
    return ref


def _ours(x: torch.Tensor, layer: nn.Module, t: dict, mult: float) -> torch.Tensor:
    info = LayerInfo.from_module(layer)
    return info.forward(x, *ALGO.merge(layer.weight.detach(), layer.bias.detach(), t, info, mult))


@pytest.fixture
def full_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make LyCORIS's per-forward random block index the last one (all blocks in use)."""
    monkeypatch.setattr(random, "randint", lambda lo, hi: hi)


@pytest.mark.usefixtures("full_rank")
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1", "conv1d"])
@pytest.mark.parametrize("alpha", [1, 3.0])
def test_lycoris_file_alpha_is_block_size_short(kind: str, alpha: float) -> None:
    """LyCORIS trains with α/(r/bs) at full rank but stores raw α, so a LoRA reader sees 1/bs of it."""
    layer = _layer(kind)
    ref = _lycoris(layer, alpha, mult=0.5)
    x = _input(layer)
    expected = ref(x)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    assert set(sd) == {"lora_up.weight", "lora_down.weight", "alpha"}
    info = LayerInfo.from_module(layer)
    assert sd["lora_up.weight"].shape == (info.out_features, R)  # 2-D even for conv
    assert sd["lora_down.weight"].shape == (R, info.in_features, *info.kernel_size)
    assert float(sd["alpha"]) == alpha
    ALGO.validate(sd, info, "k")
    base = layer(x)
    # read as every consumer reads it (LoRA, α_file/r): the effect is 1/bs of what LyCORIS ran
    assert rel_err(_ours(x, layer, sd, 0.5) - base, (expected - base) / BS) < 1e-12
    assert detect(sd) is get("lora")
    # with Lyco's convention α_file = α·bs the file reproduces LyCORIS's full-rank forward
    lyco = {**sd, "alpha": torch.tensor(float(alpha) * BS)}
    assert rel_err(_ours(x, layer, lyco, 0.5), expected) < 1e-12
    base_w, base_b = layer.weight.detach(), layer.bias.detach()
    assert rel_err(ALGO.bypass(x, base, lyco, info, 0.5, base_weight=base_w, base_bias=base_b), expected) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_truncation_keeps_alpha(kind: str) -> None:
    """At every block count LyCORIS's scale α/(b+1) equals Lyco's α_file/k on the first k = (b+1)·bs ranks."""
    layer = _layer(kind)
    ref = _lycoris(layer, 2.0)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    alpha_file = 2.0 * BS
    info = LayerInfo.from_module(layer)
    for b in range(R // BS):
        expected, _ = ref.get_diff_weight(rank=b * BS)  # LyCORIS: `rank` ranks detached + one live block
        down, up = dylora_truncate(sd["lora_down.weight"], sd["lora_up.weight"], (b + 1) * BS)
        t = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha_file)}
        assert ALGO.rank(t) == (b + 1) * BS
        assert rel_err(ALGO.delta_weight(t, info), expected.detach()) < 1e-12
        ALGO.validate(t, info, "k")


@pytest.mark.usefixtures("full_rank")
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1d"])
def test_our_tensors_load_into_lycoris(kind: str) -> None:
    layer = _layer(kind)
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="dylora", dim=R, alpha=2.0, block_size=BS))
    assert float(t["alpha"]) == 2.0 * BS
    assert torch.count_nonzero(t["lora_up.weight"]) == 0
    assert torch.count_nonzero(t["lora_down.weight"]) > 0
    t = {**t, "lora_up.weight": torch.randn_like(t["lora_up.weight"]).double()}
    t["lora_down.weight"] = t["lora_down.weight"].double()
    ref = DyLoraModule("k", layer, multiplier=0.7, lora_dim=R, alpha=float(t["alpha"]) / BS, block_size=BS).double()
    down2 = t["lora_down.weight"].reshape(R, -1)
    with torch.no_grad():
        for i in range(R // BS):
            ref.up_list[i].copy_(t["lora_up.weight"][:, i * BS : (i + 1) * BS])
            ref.down_list[i].copy_(down2[i * BS : (i + 1) * BS])
    x = _input(layer)
    assert rel_err(_ours(x, layer, t, 0.7), ref(x)) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1", "conv1d"])
def test_bypass_equals_rebuild(kind: str) -> None:
    layer = _layer(kind)
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="dylora", dim=R, alpha=1.0, block_size=BS))
    t = {k: torch.randn_like(v).double() if k != "alpha" else v for k, v in t.items()}
    x = _input(layer)
    w, b = layer.weight.detach(), layer.bias.detach()
    base = layer(x)
    for mult in (0.0, 0.5, 1.0):
        bypass = ALGO.bypass(x, base, t, info, mult, base_weight=w, base_bias=b)
        assert rel_err(bypass, _ours(x, layer, t, mult)) < 1e-12
    mw, mb = ALGO.merge(w, b, t, info, 0.0)
    assert torch.equal(mw, w)
    assert torch.equal(mb, b)


def test_sample_rank_blocks() -> None:
    g = torch.Generator().manual_seed(1)
    draws = [sample_rank_blocks(12, 4, g) for _ in range(200)]
    assert set(draws) == {4, 8, 12}
    g2 = torch.Generator().manual_seed(1)
    assert draws[:20] == [sample_rank_blocks(12, 4, g2) for _ in range(20)]
    assert sample_rank_blocks(4, 4) == 4
    with pytest.raises(InvalidConfigError, match="block_size"):
        sample_rank_blocks(10, 4)


def test_step_factors_train_only_the_last_block() -> None:
    down = torch.randn(R, 6, requires_grad=True)
    up = torch.randn(5, R, requires_grad=True)
    d, u = dylora_step_factors(down, up, R, BS)
    assert d.shape == (R, 6)
    assert u.shape == (5, R)
    lora_delta(d, u, None, 1.0, (5, 6)).sum().backward()
    assert torch.count_nonzero(down.grad[: R - BS]) == 0
    assert torch.count_nonzero(down.grad[R - BS :]) > 0
    assert torch.count_nonzero(up.grad[:, : R - BS]) == 0
    assert torch.count_nonzero(up.grad[:, R - BS :]) > 0
    d, u = dylora_step_factors(down, up, BS, BS)
    assert d.shape == (BS, 6)
    assert u.shape == (5, BS)
    assert d.requires_grad


def test_truncate_errors() -> None:
    with pytest.raises(InvalidConfigError, match="rank"):
        dylora_truncate(torch.zeros(4, 3), torch.zeros(5, 4), 5)
    with pytest.raises(InvalidConfigError, match="rank"):
        dylora_truncate(torch.zeros(4, 3), torch.zeros(5, 6), 2)


def test_registry_options_and_spec_shapes() -> None:
    assert get("dylora") is not get("lora")
    assert isinstance(get("dylora"), LoRA)
    assert ALGO.aliases == ()
    assert ALGO.detector_keys == ()
    opts = AdapterOptions(algo="dylora", dim=8, alpha=1, block_size=4)
    t = ALGO.init_tensors(LayerInfo.conv(64, 64, (3, 3)), opts)
    assert t["lora_up.weight"].shape == (64, 8)
    assert t["lora_down.weight"].shape == (8, 64, 3, 3)
    assert ALGO.rank(t) == 8
    assert ALGO.scale(t) == pytest.approx(0.5)
    assert ALGO.describe(t) == {"algo": "dylora", "rank": 8, "alpha": 4.0}
    t = ALGO.init_tensors(LayerInfo.linear(8, 8), AdapterOptions(algo="dylora", dim=8, alpha=None, block_size=2))
    assert float(t["alpha"]) == 16.0  # α = r, stored ×bs
    info = LayerInfo.linear(5, 6)
    with pytest.raises(InvalidConfigError, match="block_size"):
        ALGO.init_tensors(info, AdapterOptions(algo="dylora", dim=6, block_size=4))
    for bad in ({"use_tucker": True}, {"rs_lora": True}, {"use_scalar": True}, {"dora": True}):
        with pytest.raises(InvalidConfigError, match=next(iter(bad))):
            ALGO.check_options(AdapterOptions(algo="dylora", dim=8, **bad), info)


def test_validate_errors() -> None:
    info = LayerInfo.conv(6, 4, (3, 3))
    t = ALGO.init_tensors(info, AdapterOptions(algo="dylora", dim=R, block_size=BS))
    ALGO.validate(t, info, "k")
    with pytest.raises(CorruptFileError, match="k"):
        ALGO.validate({**t, "lora_up.weight": torch.zeros(6, R + 1)}, info, "k")
    with pytest.raises((CorruptFileError, IncompatibleBaseError), match="k"):
        ALGO.validate(t, LayerInfo.conv(7, 4, (3, 3)), "k")
