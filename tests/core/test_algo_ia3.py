"""(IA)³ against LyCORIS 4.1.3 ``IA3Module`` and against its own merge/bypass contract."""

from __future__ import annotations

import pytest
import torch
from checks import rel_err
from lycoris.modules import IA3Module
from torch import nn

from lyco_core.algorithms.base import AdapterOptions
from lyco_core.algorithms.ia3 import IA3
from lyco_core.errors import CorruptFileError, IncompatibleBaseError, InvalidConfigError
from lyco_core.layers import LayerInfo

ALGO = IA3()
MULTS = (0.0, 0.5, 1.0)


def _layers(bias: bool = True) -> dict[str, nn.Module]:
    return {
        "linear": nn.Linear(6, 5, bias=bias),
        "conv3x3": nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias),
        "conv1x1": nn.Conv2d(4, 6, 1, bias=bias),
        "conv1d": nn.Conv1d(4, 6, 3, padding=1, bias=bias),
    }


def _input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 2, layer.in_features, dtype=torch.float64)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, layer.in_channels, 9, dtype=torch.float64)
    return torch.randn(2, layer.in_channels, 7, 7, dtype=torch.float64)


def _ours(x: torch.Tensor, layer: nn.Module, t: dict[str, torch.Tensor], mult: float) -> torch.Tensor:
    info = LayerInfo.from_module(layer)
    w, b = ALGO.merge(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), t, info, mult)
    return info.forward(x, w, b)


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1", "conv1d"])
@pytest.mark.parametrize("mult", [0.5, 1.0])
def test_lycoris_tensors_match_lycoris_forward(kind: str, on_input: bool, mult: float) -> None:
    layer = _layers()[kind].double()
    ref = IA3Module("k", layer, multiplier=mult, train_on_input=on_input).double()
    with torch.no_grad():
        ref.weight.normal_()
    ref.bypass_mode = False
    x = _input(layer)
    expected = ref(x)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    assert set(sd) == {"weight", "on_input"}
    assert sd["on_input"].dtype == torch.int64
    assert rel_err(_ours(x, layer, sd, mult), expected) < 1e-12
    # and through our bypass path
    info = LayerInfo.from_module(layer)
    base = layer(x)
    got = ALGO.bypass(x, base, sd, info, mult, base_weight=layer.weight.detach(), base_bias=layer.bias.detach())
    assert rel_err(got, expected) < 1e-12


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1d"])
def test_our_tensors_load_into_lycoris(kind: str, on_input: bool) -> None:
    layer = _layers()[kind].double()
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="ia3", train_on_input=on_input))
    assert torch.count_nonzero(t["weight"]) == 0
    t = {"weight": torch.randn_like(t["weight"]).double(), "on_input": t["on_input"]}
    ref = IA3Module("k", layer, multiplier=0.7, train_on_input=on_input).double()
    ref.load_state_dict(t)
    ref.bypass_mode = False
    x = _input(layer)
    assert rel_err(_ours(x, layer, t, 0.7), ref(x)) < 1e-12


@pytest.mark.parametrize("on_input", [False, True])
def test_lycoris_bypass_scales_bias_ours_does_not(on_input: bool) -> None:
    """Without a bias LyCORIS's bypass equals ours; with one, LyCORIS's output side also scales b."""
    for bias in (False, True):
        layer = nn.Linear(6, 5, bias=bias).double()
        ref = IA3Module("k", layer, multiplier=1.0, train_on_input=on_input, bypass_mode=True).double()
        with torch.no_grad():
            ref.weight.normal_()
        x = _input(layer)
        sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        ours = _ours(x, layer, sd, 1.0)
        differs = bias and not on_input
        assert (rel_err(ours, ref(x)) > 1e-3) == differs
        if differs:  # LyCORIS: (Wx + b)(1+w); ours: Wx(1+w) + b
            assert rel_err(ours + layer.bias.detach() * sd["weight"], ref(x)) < 1e-12


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1", "conv1d", "grouped"])
def test_bypass_equals_rebuild(kind: str, on_input: bool) -> None:
    layer = nn.Conv2d(4, 6, 3, padding=1, groups=2) if kind == "grouped" else _layers()[kind]
    layer = layer.double()
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="ia3", train_on_input=on_input))
    t["weight"] = torch.randn_like(t["weight"]).double()
    ALGO.validate(t, info, "k")
    w, b = layer.weight.detach(), layer.bias.detach()
    x = _input(layer)
    base = layer(x)
    for mult in MULTS:
        mw, mb = ALGO.merge(w, b, t, info, mult)
        rebuild = info.forward(x, mw, mb)
        bypass = ALGO.bypass(x, base, t, info, mult, base_weight=w, base_bias=b)
        assert rel_err(bypass, rebuild) < 1e-12
        # delta_weight is the additive form of the same merge
        assert rel_err(w + mult * ALGO.delta_weight(t, info, w), mw) < 1e-14 or mult == 0
        if mult == 0:
            assert torch.equal(mw, w)
            assert mb is b
            assert torch.equal(bypass, base)


def test_grouped_input_side_scales_input_channels() -> None:
    layer = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False).double()
    info = LayerInfo.from_module(layer)
    t = {"weight": torch.randn(1, 4, 1, 1, dtype=torch.float64), "on_input": torch.tensor(1)}
    x = _input(layer)
    mw, _ = ALGO.merge(layer.weight.detach(), None, t, info, 0.5)
    expected = layer(x * (1 + 0.5 * t["weight"]))
    assert rel_err(info.forward(x, mw), expected) < 1e-12


def test_spec_shapes() -> None:
    opts = AdapterOptions(algo="ia3", dim=4, alpha=1)
    t = ALGO.init_tensors(LayerInfo.linear(64, 64), opts)
    assert t["weight"].shape == (64,)
    assert t["on_input"].shape == ()
    assert t["on_input"].dtype == torch.int64
    assert ALGO.init_tensors(LayerInfo.linear(1024, 320), opts)["weight"].shape == (1024,)
    conv = ALGO.init_tensors(LayerInfo.conv(64, 64, (3, 3)), opts)
    assert conv["weight"].shape == (1, 64, 1, 1)
    assert ALGO.init_tensors(LayerInfo.conv(256, 256, (3, 3)), opts)["weight"].shape == (1, 256, 1, 1)
    inp = ALGO.init_tensors(LayerInfo.linear(1024, 320), AdapterOptions(algo="ia3", train_on_input=True))
    assert inp["weight"].shape == (320,)
    assert int(inp["on_input"]) == 1
    assert ALGO.init_tensors(LayerInfo.conv(8, 3, (3, 3)), opts)["weight"].shape == (1, 8, 1, 1)
    assert ALGO.init_tensors(LayerInfo.conv(8, 3, (3, 3)), AdapterOptions(algo="ia3", train_on_input=True))[
        "weight"
    ].shape == (1, 3, 1, 1)


def test_on_input_in_any_dtype() -> None:
    """LyCORIS casts every tensor on save, so on_input may arrive as a float."""
    layer = nn.Linear(6, 5).double()
    info = LayerInfo.from_module(layer)
    t = {"weight": torch.randn(6, dtype=torch.float64), "on_input": torch.tensor(1.0, dtype=torch.float16)}
    ALGO.validate(t, info, "k")
    assert ALGO.describe(t) == {"algo": "ia3", "on_input": True}


def test_validate_errors() -> None:
    info = LayerInfo.linear(5, 6, bias=True)
    with pytest.raises(IncompatibleBaseError, match=r"k\.weight"):
        ALGO.validate({"weight": torch.zeros(6), "on_input": torch.tensor(0)}, info, "k")
    with pytest.raises(IncompatibleBaseError, match=r"k\.weight"):
        ALGO.validate({"weight": torch.zeros(5), "on_input": torch.tensor(1)}, info, "k")
    with pytest.raises(CorruptFileError, match=r"k\.on_input"):
        ALGO.validate({"weight": torch.zeros(5), "on_input": torch.tensor(2)}, info, "k")
    with pytest.raises(IncompatibleBaseError, match="k"):
        ALGO.validate({"weight": torch.zeros(5), "on_input": torch.tensor(0)}, LayerInfo("norm", 5, 5), "k")
    ALGO.validate({"weight": torch.zeros(5), "on_input": torch.tensor(0)}, info, "k")
    ALGO.validate({"weight": torch.zeros(1, 6, 1, 1), "on_input": torch.tensor(0)}, LayerInfo.conv(6, 4, (3, 3)), "k")


def test_describe_rank_scale_and_flags() -> None:
    t = {"weight": torch.zeros(5), "on_input": torch.tensor(0)}
    assert ALGO.rank(t) is None
    assert ALGO.scale(t) == 1.0
    assert ALGO.describe(t) == {"algo": "ia3", "on_input": False}
    assert ALGO.matches(t)
    assert not ALGO.matches({"weight": torch.zeros(5)})
    assert not ALGO.additive
    assert ALGO.needs_base_weight
    assert "on_input" in ALGO.frozen_names
    with pytest.raises(InvalidConfigError, match="use_scalar"):
        ALGO.check_options(AdapterOptions(algo="ia3", use_scalar=True), LayerInfo.linear(5, 6))
