"""Full (native) fine-tune against LyCORIS 4.1.3 ``FullModule`` and against its own contract."""

from __future__ import annotations

import pytest
import torch
from checks import rel_err
from lycoris.modules import FullModule
from torch import nn

from lyco_core.algorithms import get
from lyco_core.algorithms.base import AdapterOptions
from lyco_core.algorithms.full import Full
from lyco_core.errors import CorruptFileError, IncompatibleBaseError
from lyco_core.layers import LayerInfo

ALGO = Full()


def _layer(kind: str, bias: bool = True) -> nn.Module:
    return {
        "linear": lambda: nn.Linear(6, 5, bias=bias),
        "conv3x3": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias),
        "conv1x1": lambda: nn.Conv2d(4, 6, 1, bias=bias),
        "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1, bias=bias),
        "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=bias),
    }[kind]()


def _input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 2, layer.in_features, dtype=torch.float64)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, layer.in_channels, 9, dtype=torch.float64)
    return torch.randn(2, layer.in_channels, 7, 7, dtype=torch.float64)


def _ours(
    x: torch.Tensor, info: LayerInfo, w: torch.Tensor, b: torch.Tensor | None, t: dict, mult: float
) -> torch.Tensor:
    return info.forward(x, *ALGO.merge(w, b, t, info, mult))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1", "conv1d", "grouped"])
@pytest.mark.parametrize("mult", [0.5, 1.0])
def test_lycoris_trained_tensors_match_lycoris_forward(kind: str, bias: bool, mult: float) -> None:
    """Train-like flow: apply_to folds W into the module, the weight moves, the file stores the diff."""
    layer = _layer(kind, bias).double()
    info = LayerInfo.from_module(layer)
    w0 = layer.weight.detach().clone()
    b0 = None if layer.bias is None else layer.bias.detach().clone()
    ref = FullModule("k", layer, multiplier=mult).double()
    ref.apply_to()
    with torch.no_grad():
        ref.weight.add_(torch.randn_like(ref.weight))
        if ref.bias is not None:
            ref.bias.add_(torch.randn_like(ref.bias))
    x = _input(layer)
    expected = ref(x)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    assert set(sd) == ({"diff", "diff_b"} if bias else {"diff"})
    ALGO.validate(sd, info, "k")
    assert rel_err(_ours(x, info, w0, b0, sd, mult), expected) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1d"])
def test_our_tensors_load_into_lycoris(kind: str) -> None:
    layer = _layer(kind).double()
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="full"))
    assert set(t) == {"diff", "diff_b"}
    assert all(torch.count_nonzero(v) == 0 for v in t.values())
    t = {k: torch.randn_like(v).double() for k, v in t.items()}
    with torch.no_grad():
        ref = FullModule.make_module_from_state_dict("k", layer, t["diff"], t["diff_b"]).double()
    ref.multiplier = 0.7
    x = _input(layer)
    w, b = layer.weight.detach(), layer.bias.detach()
    assert rel_err(_ours(x, info, w, b, t, 0.7), ref(x)) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1d", "grouped"])
def test_bypass_equals_rebuild(kind: str) -> None:
    layer = _layer(kind).double()
    info = LayerInfo.from_module(layer)
    t = {k: torch.randn_like(v).double() for k, v in ALGO.init_tensors(info, AdapterOptions(algo="full")).items()}
    x = _input(layer)
    w, b = layer.weight.detach(), layer.bias.detach()
    base = layer(x)
    for mult in (0.0, 0.5, 1.0):
        bypass = ALGO.bypass(x, base, t, info, mult, base_weight=w, base_bias=b)
        assert rel_err(bypass, _ours(x, info, w, b, t, mult)) < 1e-12
        if mult == 0:
            mw, mb = ALGO.merge(w, b, t, info, 0.0)
            assert torch.equal(mw, w)
            assert torch.equal(mb, b)


def test_diff_b_on_layer_without_bias() -> None:
    """LyCORIS gives such a layer a bias; so does the merge here."""
    info = LayerInfo.linear(5, 6, bias=False)
    t = {"diff": torch.randn(5, 6), "diff_b": torch.randn(5)}
    _, b = ALGO.merge(torch.zeros(5, 6), None, t, info, 0.5)
    assert torch.allclose(b, 0.5 * t["diff_b"])


def test_spec_shapes_names_and_facts() -> None:
    opts = AdapterOptions(algo="full")
    assert ALGO.init_tensors(LayerInfo.linear(64, 64), opts)["diff"].shape == (64, 64)
    t = ALGO.init_tensors(LayerInfo.linear(1024, 320, bias=True), opts)
    assert t["diff"].shape == (1024, 320)
    assert t["diff_b"].shape == (1024,)
    t = ALGO.init_tensors(LayerInfo.conv(64, 64, (3, 3), bias=True), opts)
    assert t["diff"].shape == (64, 64, 3, 3)
    assert t["diff_b"].shape == (64,)
    assert set(ALGO.init_tensors(LayerInfo.conv(64, 64, (1, 1)), opts)) == {"diff"}
    assert get("native") is get("diff") is get("full")
    assert ALGO.rank(t) is None
    assert ALGO.scale(t) == 1.0
    assert ALGO.describe(t) == {"algo": "full"}
    assert not ALGO.default_bypass
    assert ALGO.matches(t)


def test_validate_errors() -> None:
    info = LayerInfo.conv(6, 4, (3, 3), bias=True)
    with pytest.raises(IncompatibleBaseError, match=r"k\.diff:"):
        ALGO.validate({"diff": torch.zeros(6, 4, 1, 1)}, info, "k")
    with pytest.raises(IncompatibleBaseError, match=r"k\.diff_b"):
        ALGO.validate({"diff": torch.zeros(6, 4, 3, 3), "diff_b": torch.zeros(4)}, info, "k")
    with pytest.raises(CorruptFileError, match=r"k\.diff"):
        ALGO.validate({"diff_b": torch.zeros(6)}, info, "k")
    with pytest.raises(IncompatibleBaseError, match="k"):
        ALGO.validate({"diff": torch.zeros(6)}, LayerInfo("norm", 6, 6), "k")
