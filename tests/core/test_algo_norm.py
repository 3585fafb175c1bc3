"""Norm-layer fine-tune against LyCORIS 4.1.3 ``NormModule`` on LayerNorm and GroupNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checks import rel_err
from lycoris.modules import NormModule
from torch import nn

from lyco_core.algorithms.base import AdapterOptions
from lyco_core.algorithms.norm import Norm, norm_merge
from lyco_core.errors import CorruptFileError, IncompatibleBaseError, InvalidConfigError, UnsupportedLayerError
from lyco_core.layers import LayerInfo

ALGO = Norm()
C = 8


def _layer(kind: str) -> nn.Module:
    layer = nn.LayerNorm(C) if kind == "layernorm" else nn.GroupNorm(2, C)
    with torch.no_grad():  # a non-trivial affine base
        layer.weight.normal_()
        layer.bias.normal_()
    return layer.double()


def _input(kind: str) -> torch.Tensor:
    shape = (3, 5, C) if kind == "layernorm" else (2, C, 4, 4)
    return torch.randn(*shape, dtype=torch.float64)


def _norm_op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, w, b, layer.eps)
    return F.group_norm(x, layer.num_groups, w, b, layer.eps)


def _ours(layer: nn.Module, x: torch.Tensor, t: dict, mult: float) -> torch.Tensor:
    info = LayerInfo.from_module(layer)
    w, b = ALGO.merge(layer.weight.detach(), layer.bias.detach(), t, info, mult)
    return _norm_op(layer, x, w, b)


@pytest.mark.parametrize("kind", ["layernorm", "groupnorm"])
@pytest.mark.parametrize("mult", [0.5, 1.0])
def test_lycoris_tensors_match_lycoris_forward(kind: str, mult: float) -> None:
    layer = _layer(kind)
    ref = NormModule("k", layer, multiplier=mult).double()
    with torch.no_grad():
        ref.w_norm.normal_()
        ref.b_norm.normal_()
    x = _input(kind)
    got_ref = ref(x)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    assert set(sd) == {"w_norm", "b_norm"}
    w, b = layer.weight.detach(), layer.bias.detach()
    expected = _norm_op(layer, x, w + mult * sd["w_norm"], b + mult * sd["b_norm"])
    assert rel_err(got_ref, expected) < 1e-12  # LyCORIS's forward is the affine merge
    assert rel_err(_ours(layer, x, sd, mult), expected) < 1e-14
    ALGO.validate(sd, LayerInfo.from_module(layer), "k")


@pytest.mark.parametrize("kind", ["layernorm", "groupnorm"])
def test_our_tensors_load_into_lycoris(kind: str) -> None:
    layer = _layer(kind)
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="norm"))
    assert set(t) == {"w_norm", "b_norm"}
    assert all(torch.count_nonzero(v) == 0 for v in t.values())
    t = {k: torch.randn_like(v).double() for k, v in t.items()}
    with torch.no_grad():
        ref = NormModule.make_module_from_state_dict("k", layer, t["w_norm"], t["b_norm"]).double()
    ref.multiplier = 0.7
    x = _input(kind)
    assert rel_err(_ours(layer, x, t, 0.7), ref(x)) < 1e-12


def test_multiplier_zero_and_missing_bias() -> None:
    w, b = torch.randn(C), torch.randn(C)
    t = {"w_norm": torch.randn(C), "b_norm": torch.randn(C)}
    mw, mb = ALGO.merge(w, b, t, LayerInfo("norm", C, C, has_bias=True), 0.0)
    assert torch.equal(mw, w)
    assert torch.equal(mb, b)
    # a bias-free LayerNorm: no b_norm is created, the bias stays None
    layer = nn.LayerNorm(C, bias=False)
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="norm"))
    assert set(t) == {"w_norm"}
    t["w_norm"] = torch.randn(C)
    mw, mb = ALGO.merge(layer.weight.detach(), None, t, info, 0.5)
    assert mb is None
    assert torch.allclose(mw, layer.weight.detach() + 0.5 * t["w_norm"])
    # b_norm on a bias-free layer counts the base bias as 0
    _, mb = norm_merge(torch.ones(C), None, torch.zeros(C), torch.full((C,), 2.0), 0.5)
    assert torch.equal(mb, torch.ones(C))


def test_spec_shapes_and_facts() -> None:
    t = ALGO.init_tensors(LayerInfo("norm", 64, 64, has_bias=True), AdapterOptions(algo="norm"))
    assert t["w_norm"].shape == (64,)
    assert t["b_norm"].shape == (64,)
    assert ALGO.layer_kinds == {"norm"}
    assert ALGO.rank(t) is None
    assert ALGO.scale(t) == 1.0
    assert ALGO.describe(t) == {"algo": "norm"}
    assert ALGO.matches(t)
    assert torch.equal(ALGO.delta_weight(t, LayerInfo("norm", 64, 64)), t["w_norm"])
    assert torch.equal(ALGO.delta_bias(t, LayerInfo("norm", 64, 64)), t["b_norm"])
    with pytest.raises(UnsupportedLayerError):
        ALGO.bypass(torch.zeros(1, 64), torch.zeros(1, 64), t, LayerInfo("norm", 64, 64))
    with pytest.raises(InvalidConfigError, match="use_scalar"):
        ALGO.check_options(AdapterOptions(algo="norm", use_scalar=True), LayerInfo("norm", 64, 64))


def test_validate_errors() -> None:
    info = LayerInfo.from_module(nn.GroupNorm(2, C))
    ALGO.validate({"w_norm": torch.zeros(C), "b_norm": torch.zeros(C)}, info, "k")
    with pytest.raises(IncompatibleBaseError, match=r"k\.w_norm"):
        ALGO.validate({"w_norm": torch.zeros(C + 1)}, info, "k")
    with pytest.raises(IncompatibleBaseError, match=r"k\.b_norm"):
        ALGO.validate({"w_norm": torch.zeros(C), "b_norm": torch.zeros(2)}, info, "k")
    with pytest.raises(CorruptFileError, match=r"k\.w_norm"):
        ALGO.validate({"b_norm": torch.zeros(C)}, info, "k")
    with pytest.raises(IncompatibleBaseError, match="k"):
        ALGO.validate({"w_norm": torch.zeros(C)}, LayerInfo.linear(C, C), "k")
