"""LoRA/LoCon against LyCORIS 4.1.3's LoConModule, and Lyco's own bypass == rebuild contract."""

from __future__ import annotations

import math

import pytest
import torch
from checks import rel_err
from lycoris.modules.locon import LoConModule
from torch import nn

from lyco_core.algorithms import get
from lyco_core.algorithms.base import AdapterOptions
from lyco_core.errors import CorruptFileError, IncompatibleBaseError
from lyco_core.layers import LayerInfo

LORA = get("lora")

LAYERS = {
    "linear": lambda: nn.Linear(24, 40, bias=True),
    "conv3x3": lambda: nn.Conv2d(16, 24, 3, padding=1, bias=True),
    "conv3x3_stride": lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1),
    "conv1x1": lambda: nn.Conv2d(16, 24, 1),
    "conv1d": lambda: nn.Conv1d(16, 24, 3, padding=1),
}
INPUTS = {
    "linear": (3, 24),
    "conv3x3": (2, 16, 9, 9),
    "conv3x3_stride": (2, 16, 9, 9),
    "conv1x1": (2, 16, 5, 5),
    "conv1d": (2, 16, 11),
}


def _lycoris_tensors(mod: LoConModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mod.custom_state_dict().items()}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(("tucker", "rs", "alpha"), [(False, False, 1.0), (True, False, 2.0), (False, True, 4.0)])
@pytest.mark.parametrize("mu", [1.0, 0.6])
def test_lycoris_file_gives_lycoris_forward(kind: str, tucker: bool, rs: bool, alpha: float, mu: float) -> None:
    base = LAYERS[kind]()
    ref = LoConModule("m", base, multiplier=mu, lora_dim=4, alpha=alpha, use_tucker=tucker, rs_lora=rs)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ref.apply_to()
    x = torch.randn(*INPUTS[kind])
    expected = base(x)
    t = _lycoris_tensors(ref)
    layer = LayerInfo.from_module(base)
    ref.restore()
    w, b = LORA.merge(base.weight.detach(), base.bias.detach() if base.bias is not None else None, t, layer, mu)
    assert rel_err(layer.forward(x, w, b), expected) < 1e-5
    bypass = LORA.bypass(x, base(x), t, layer, mu)
    assert rel_err(bypass, expected) < 1e-5


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("tucker", [False, True])
def test_lyco_tensors_load_into_lycoris(kind: str, tucker: bool) -> None:
    base = LAYERS[kind]()
    layer = LayerInfo.from_module(base)
    opts = AdapterOptions(dim=4, alpha=2.0, use_tucker=tucker)
    t = LORA.init_tensors(layer, opts)
    t = {k: (torch.randn_like(v) if k != "alpha" else v) for k, v in t.items()}
    ref = LoConModule("m", base, lora_dim=4, alpha=2.0, use_tucker=tucker)
    ref.load_state_dict({k: v for k, v in t.items()}, strict=True)
    ref.apply_to()
    x = torch.randn(*INPUTS[kind])
    expected = base(x)
    ref.restore()
    got = LORA.bypass(x, base(x), t, layer, 1.0)
    assert rel_err(got, expected) < 1e-5


def test_rs_lora_alpha_storage_matches_spec() -> None:
    layer = LayerInfo.linear(64, 64)
    t = LORA.init_tensors(layer, AdapterOptions(dim=16, alpha=4.0, rs_lora=True))
    assert float(t["alpha"]) == pytest.approx(16.0)  # α·r/√r, so α_file/r = α/√r
    assert LORA.scale(t) == pytest.approx(4.0 / math.sqrt(16))


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
def test_bypass_equals_rebuild(kind: str, mu: float) -> None:
    base = LAYERS[kind]()
    layer = LayerInfo.from_module(base)
    t = {k: torch.randn_like(v) if k != "alpha" else v for k, v in LORA.init_tensors(layer, AdapterOptions()).items()}
    x = torch.randn(*INPUTS[kind])
    bias = base.bias.detach() if base.bias is not None else None
    w, b = LORA.merge(base.weight.detach(), bias, t, layer, mu)
    assert rel_err(LORA.bypass(x, base(x), t, layer, mu), layer.forward(x, w, b)) < 1e-5
    if mu == 0.0:
        assert torch.equal(w, base.weight.detach())


def test_init_gives_zero_delta_and_kohya_shapes() -> None:
    layer = LayerInfo.conv(64, 64, (3, 3))
    t = LORA.init_tensors(layer, AdapterOptions(dim=4))
    assert t["lora_down.weight"].shape == (4, 64, 3, 3)
    assert t["lora_up.weight"].shape == (64, 4, 1, 1)
    assert t["alpha"].shape == ()
    assert t["alpha"].dtype == torch.float32
    assert torch.count_nonzero(LORA.delta_weight(t, layer)) == 0
    tt = LORA.init_tensors(layer, AdapterOptions(dim=4, use_tucker=True))
    assert tt["lora_down.weight"].shape == (4, 64, 1, 1)
    assert tt["lora_mid.weight"].shape == (4, 4, 3, 3)


def test_validate_names_the_key() -> None:
    layer = LayerInfo.linear(40, 24)
    t = LORA.init_tensors(LayerInfo.linear(40, 24), AdapterOptions(dim=4))
    t["lora_up.weight"] = torch.zeros(40, 5)
    with pytest.raises(CorruptFileError, match="lora_unet_x"):
        LORA.validate(t, layer, "lora_unet_x")
    wrong = LORA.init_tensors(LayerInfo.linear(32, 24), AdapterOptions(dim=4))
    with pytest.raises(IncompatibleBaseError, match="lora_unet_y"):
        LORA.validate(wrong, layer, "lora_unet_y")
