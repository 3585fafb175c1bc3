"""GLoRA against LyCORIS 4.1.3 ``GLoRAModule`` and against its own merge/bypass contract."""

from __future__ import annotations

import math

import pytest
import torch
from checks import rel_err
from lycoris.modules import GLoRAModule
from torch import nn

from lyco_core.algorithms.base import AdapterOptions
from lyco_core.algorithms.glora import GLoRA, glora_delta
from lyco_core.errors import CorruptFileError, IncompatibleBaseError, InvalidConfigError, UnsupportedLayerError
from lyco_core.layers import LayerInfo

ALGO = GLoRA()
NAMES = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


def _layer(kind: str, bias: bool = True) -> nn.Module:
    return {
        "linear": lambda: nn.Linear(6, 5, bias=bias),
        "conv3x3": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias),
        "conv1x1": lambda: nn.Conv2d(4, 6, 1, bias=bias),
        "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1, bias=bias),
        "dilated": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=bias),
    }[kind]()


def _input(layer: nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 2, layer.in_features, dtype=dtype)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, layer.in_channels, 9, dtype=dtype)
    return torch.randn(2, layer.in_channels, 7, 7, dtype=dtype)


def _params(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return layer.weight.detach(), None if layer.bias is None else layer.bias.detach()


def _rebuild(x: torch.Tensor, layer: nn.Module, t: dict[str, torch.Tensor], mult: float) -> torch.Tensor:
    info = LayerInfo.from_module(layer)
    return info.forward(x, *ALGO.merge(*_params(layer), t, info, mult))


def _bypass(x: torch.Tensor, layer: nn.Module, t: dict[str, torch.Tensor], mult: float) -> torch.Tensor:
    w, b = _params(layer)
    return ALGO.bypass(x, layer(x), t, LayerInfo.from_module(layer), mult, base_weight=w, base_bias=b)


def _lycoris(layer: nn.Module, r: int, alpha: float | int, mult: float) -> GLoRAModule:
    ref = GLoRAModule("k", layer, multiplier=mult, lora_dim=r, alpha=alpha).to(layer.weight.dtype)
    with torch.no_grad():
        for n in NAMES:
            ref.get_parameter(n).normal_()
    return ref


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1", "conv1d", "dilated"])
@pytest.mark.parametrize(("alpha", "mult"), [(2, 1.0), (1.5, 0.5)])
def test_lycoris_tensors_match_lycoris_forward(kind: str, alpha: float, mult: float) -> None:
    layer = _layer(kind).double()
    ref = _lycoris(layer, 3, alpha, mult)
    x = _input(layer)
    expected = ref(x)  # default: rebuild mode
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    assert set(sd) == {*NAMES, "alpha"}
    if isinstance(alpha, int):
        assert sd["alpha"].dtype == torch.int64  # LyCORIS keeps a Python int as int64
    assert rel_err(_rebuild(x, layer, sd, mult), expected) < 1e-12
    assert rel_err(_bypass(x, layer, sd, mult), expected) < 1e-12
    if kind != "dilated":  # LyCORIS's bypass drops the dilation in b2 (see glora.py)
        ref.bypass_mode = True
        assert rel_err(ref(x), expected) < 1e-12


def test_lycoris_bypass_ignores_dilation() -> None:
    layer = _layer("dilated").double()
    ref = _lycoris(layer, 3, 2.0, 1.0)
    x = _input(layer)
    rebuild = ref(x)
    ref.bypass_mode = True
    with pytest.raises(RuntimeError):  # shapes no longer add up: b2 ran without dilation
        ref(x)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    assert rel_err(_bypass(x, layer, sd, 1.0), rebuild) < 1e-12


def test_lycoris_fp32() -> None:
    layer = _layer("conv3x3")
    ref = _lycoris(layer, 4, 1.0, 1.0)
    x = _input(layer, torch.float32)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    expected = ref(x)
    assert rel_err(_rebuild(x, layer, sd, 1.0), expected) < 1e-5
    assert rel_err(_bypass(x, layer, sd, 1.0), expected) < 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1d"])
def test_our_tensors_load_into_lycoris(kind: str) -> None:
    layer = _layer(kind).double()
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="glora", dim=3, alpha=1.5))
    assert torch.count_nonzero(t["a2.weight"]) == 0
    assert torch.count_nonzero(t["b2.weight"]) == 0
    assert torch.count_nonzero(t["a1.weight"]) > 0
    assert torch.count_nonzero(t["b1.weight"]) > 0
    t = {k: (torch.randn_like(v) if k != "alpha" else v).double() for k, v in t.items()}
    ref = GLoRAModule.make_module_from_state_dict("k", layer, *(t[n] for n in NAMES), None, t["alpha"]).double()
    ref.multiplier = 0.7
    x = _input(layer)
    expected = ref(x)
    assert rel_err(_rebuild(x, layer, t, 0.7), expected) < 1e-12
    assert rel_err(_bypass(x, layer, t, 0.7), expected) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1", "conv1d", "dilated"])
def test_bypass_equals_rebuild(kind: str) -> None:
    layer = _layer(kind).double()
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="glora", dim=2, alpha=4))
    t = {k: (torch.randn_like(v) if k != "alpha" else v).double() for k, v in t.items()}
    ALGO.validate(t, info, "k")
    x = _input(layer)
    w, b = _params(layer)
    for mult in (0.0, 0.5, 1.0):
        rebuild, bypass = _rebuild(x, layer, t, mult), _bypass(x, layer, t, mult)
        assert rel_err(bypass, rebuild) < 1e-12
        if mult == 0:
            mw, mb = ALGO.merge(w, b, t, info, 0.0)
            assert torch.equal(mw, w)
            assert torch.equal(mb, b)
            assert torch.equal(bypass, layer(x))


def test_hidden_hook_reaches_both_branches() -> None:
    layer = _layer("linear").double()
    info = LayerInfo.from_module(layer)
    t = {
        k: (torch.randn_like(v) if k != "alpha" else v).double()
        for k, v in ALGO.init_tensors(info, AdapterOptions(algo="glora", dim=2)).items()
    }
    x = _input(layer)
    base = layer(x)
    zeroed = ALGO.bypass(x, base, t, info, 1.0, base_weight=layer.weight.detach(), hidden_hook=torch.zeros_like)
    assert torch.equal(zeroed, base)


def test_delta_formula_and_scale() -> None:
    w = torch.randn(5, 6, dtype=torch.float64)
    a1, a2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    b1, b2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    t = {"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": torch.tensor(2)}
    assert ALGO.rank(t) == 3
    assert ALGO.scale(t) == pytest.approx(2 / 3)
    expected = (2 / 3) * (w @ (a1 @ a2) + b1 @ b2)
    assert rel_err(ALGO.delta_weight(t, LayerInfo.linear(5, 6), w), expected) < 1e-13
    assert rel_err(glora_delta(w, a1, a2, b1, b2, 1.0), w @ a1 @ a2 + b1 @ b2) < 1e-13
    assert ALGO.describe(t) == {"algo": "glora", "rank": 3, "alpha": 2.0}


def test_spec_shapes_and_alpha() -> None:
    opts = AdapterOptions(algo="glora", dim=4, alpha=1)
    lin = ALGO.init_tensors(LayerInfo.linear(1024, 320), opts)
    assert {k: tuple(v.shape) for k, v in lin.items()} == {
        "a1.weight": (320, 4),
        "a2.weight": (4, 320),
        "b1.weight": (1024, 4),
        "b2.weight": (4, 320),
        "alpha": (),
    }
    conv = ALGO.init_tensors(LayerInfo.conv(256, 256, (3, 3)), opts)
    assert {k: tuple(v.shape) for k, v in conv.items()} == {
        "a1.weight": (256, 4, 1, 1),
        "a2.weight": (4, 256, 1, 1),
        "b1.weight": (256, 4, 1, 1),
        "b2.weight": (4, 256, 3, 3),
        "alpha": (),
    }
    assert float(conv["alpha"]) == 1.0
    assert (
        float(ALGO.init_tensors(LayerInfo.linear(8, 8), AdapterOptions(algo="glora", dim=4, alpha=None))["alpha"])
        == 4.0
    )
    rs = ALGO.init_tensors(LayerInfo.linear(8, 8), AdapterOptions(algo="glora", dim=16, alpha=4, rs_lora=True))
    assert ALGO.scale(rs) == pytest.approx(4 / math.sqrt(16))


def test_options_and_layers_rejected() -> None:
    with pytest.raises(InvalidConfigError, match="use_scalar"):
        ALGO.init_tensors(LayerInfo.linear(5, 6), AdapterOptions(algo="glora", use_scalar=True))
    with pytest.raises(UnsupportedLayerError, match="grouped"):
        ALGO.init_tensors(LayerInfo.conv(6, 4, (3, 3), groups=2), AdapterOptions(algo="glora"))


def test_validate_errors() -> None:
    info = LayerInfo.conv(6, 4, (3, 3), bias=True)
    good = ALGO.init_tensors(info, AdapterOptions(algo="glora", dim=2))
    ALGO.validate(good, info, "k")
    with pytest.raises(IncompatibleBaseError, match=r"k\.b2\.weight"):
        ALGO.validate({**good, "b2.weight": torch.zeros(2, 4, 1, 1)}, info, "k")
    with pytest.raises(IncompatibleBaseError, match=r"k\.b1\.weight"):
        ALGO.validate({**good, "b1.weight": torch.zeros(7, 2, 1, 1)}, info, "k")
    with pytest.raises(CorruptFileError, match=r"k\.a1\.weight"):
        ALGO.validate({**good, "a1.weight": torch.zeros(4, 3, 1, 1)}, info, "k")
    with pytest.raises(CorruptFileError, match=r"k\.bm\.weight"):
        ALGO.validate({**good, "bm.weight": torch.zeros(2, 2, 3, 3)}, info, "k")
    with pytest.raises(IncompatibleBaseError, match="k"):
        ALGO.validate(good, LayerInfo.conv(6, 8, (3, 3)), "k")
    with pytest.raises(IncompatibleBaseError, match="k"):
        ALGO.validate(good, LayerInfo.conv(6, 4, (3, 3), groups=2), "k")
