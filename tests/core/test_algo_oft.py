"""Diag-OFT against LyCORIS 4.1.3's DiagOFTModule, plus Lyco's own contract (bypass == rebuild, μ=0 == base)."""

from __future__ import annotations

import pytest
import torch
from checks import make_input, rel_err, state_dict_copy
from lycoris.modules.diag_oft import DiagOFTModule
from torch import nn

from lyco_core.algorithms import detect, get
from lyco_core.algorithms.base import AdapterOptions
from lyco_core.algorithms.oft import NORM_EPS, DiagOFT, cayley
from lyco_core.errors import CorruptFileError, IncompatibleBaseError, InvalidConfigError
from lyco_core.layers import LayerInfo

ALGO = DiagOFT()

LAYERS = {
    "linear64": lambda: nn.Linear(64, 64),
    "linear320x1024": lambda: nn.Linear(320, 1024),
    "conv3x3": lambda: nn.Conv2d(64, 64, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(64, 64, 1),
    "conv1d": lambda: nn.Conv1d(32, 48, 3, padding=1),
}
# (constraint c, rescaled): none; c so small that it clamps; c so large that it does not
VARIANTS = [(0.0, False), (0.01, True), (0.01, False), (100.0, True)]
# every variant on the small layers, the clamping rescaled one on the large layer (keeps the file fast)
CASES = [(n, c, r) for n in LAYERS for c, r in VARIANTS if n != "linear320x1024" or (c, r) == (0.01, True)]


def lyco_module(layer: nn.Module, c: float, rescaled: bool, mult: float = 1.0, dim: int = 4) -> DiagOFTModule:
    m = DiagOFTModule("k", layer, mult, lora_dim=dim, constraint=c, rescaled=rescaled)
    with torch.no_grad():
        m.oft_blocks.normal_(0, 0.3)
        if rescaled:
            m.rescale.normal_(1, 0.2)
    return m


def our_forward(layer: nn.Module, t: dict[str, torch.Tensor], x: torch.Tensor, mu: float = 1.0) -> torch.Tensor:
    info = LayerInfo.from_module(layer)
    w, b = ALGO.merge(layer.weight.detach(), layer.bias.detach(), t, info, mu)
    return info.forward(x, w, b)


# ------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Linear(64, 64), (16, 4, 4)),
        (nn.Linear(320, 1024), (256, 4, 4)),
        (nn.Conv2d(64, 64, 3), (16, 4, 4)),
        (nn.Conv2d(64, 64, 1), (16, 4, 4)),
        (nn.Conv2d(256, 256, 3), (64, 4, 4)),
    ],
)
def test_spec9_shapes_and_lycoris_layout(layer: nn.Module, shape: tuple[int, ...]) -> None:
    info = LayerInfo.from_module(layer)
    for rescaled in (False, True):
        t = ALGO.init_tensors(info, AdapterOptions(algo="diag-oft", dim=4, rescaled=rescaled))
        assert tuple(t["oft_blocks"].shape) == shape
        assert t["alpha"].ndim == 0
        assert t["alpha"].dtype == torch.float32
        assert float(t["alpha"]) == 0.0
        ref = DiagOFTModule("k", layer, 1.0, lora_dim=4, constraint=0.0, rescaled=rescaled).state_dict()
        assert set(ref) == set(t)
        for k, v in ref.items():
            assert tuple(v.shape) == tuple(t[k].shape), k
            assert v.dtype == t[k].dtype, k
            assert torch.equal(v, t[k]), k  # zero blocks, unit rescale, alpha = 0
        if rescaled:
            assert tuple(t["rescale"].shape) == (info.out_features, *([1] * (layer.weight.ndim - 1)))


def test_block_size_follows_factorize() -> None:
    info = LayerInfo.linear(320, 8)
    assert tuple(ALGO.init_tensors(info, AdapterOptions(dim=7))["oft_blocks"].shape) == (64, 5, 5)
    assert tuple(ALGO.init_tensors(LayerInfo.linear(64, 8), AdapterOptions(dim=16))["oft_blocks"].shape) == (16, 4, 4)


# ------------------------------------------------------------------------------------------------- vs LyCORIS
@pytest.mark.parametrize(("name", "c", "rescaled"), CASES)
def test_lycoris_tensors_match_lycoris_forward(name: str, c: float, rescaled: bool) -> None:
    layer = LAYERS[name]()
    m = lyco_module(layer, c, rescaled)
    t = state_dict_copy(m)
    assert set(t) == {"oft_blocks", "alpha", *(["rescale"] if rescaled else [])}
    info = LayerInfo.from_module(layer)
    q = t["oft_blocks"] - t["oft_blocks"].transpose(1, 2)
    if c == 0.01:  # the constraint really clamps here
        assert float(q.norm()) + NORM_EPS > c * info.out_features
    elif c > 0:
        assert float(q.norm()) < c * info.out_features
    x = make_input(layer)
    with torch.no_grad():
        ref = m(x)
        ours = our_forward(layer, t, x)
        byp = ALGO.bypass(x, layer(x), t, info, 1.0, base_weight=layer.weight.detach(), base_bias=layer.bias.detach())
        dw_ref, _ = m.get_diff_weight(1.0)
    assert rel_err(ours, ref) <= 1e-5
    assert rel_err(byp, ref) <= 1e-5
    dw = ALGO.delta_weight(t, info, layer.weight.detach())
    assert dw.shape == layer.weight.shape
    assert rel_err(dw, dw_ref) <= 1e-5


@pytest.mark.parametrize("name", ["linear64", "conv3x3", "linear320x1024"])
def test_our_init_loaded_into_lycoris(name: str) -> None:
    layer = LAYERS[name]()
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="oft", dim=4, constraint=0.005, rescaled=True))
    t["oft_blocks"] = torch.randn_like(t["oft_blocks"]) * 0.3
    t["rescale"] = 1 + 0.2 * torch.randn_like(t["rescale"])
    m = DiagOFTModule("k", layer, 1.0, lora_dim=4, constraint=0.005, rescaled=True)
    m.load_state_dict(t)
    x = make_input(layer)
    with torch.no_grad():
        assert rel_err(our_forward(layer, t, x), m(x)) <= 1e-5


@pytest.mark.parametrize("name", ["linear64", "conv3x3", "conv1x1"])
def test_multiplier_half(name: str) -> None:
    layer = LAYERS[name]()
    x = make_input(layer)
    # without rescale Lyco and LyCORIS interpolate R the same way
    m = lyco_module(layer, 0.01, False, mult=0.5)
    with torch.no_grad():
        assert rel_err(our_forward(layer, state_dict_copy(m), x, 0.5), m(x)) <= 1e-5
    # with rescale Lyco also interpolates it: equal to LyCORIS with rescale' = 0.5·rescale + 0.5
    m = lyco_module(layer, 0.01, True, mult=0.5)
    t = state_dict_copy(m)
    with torch.no_grad():
        m.rescale.mul_(0.5).add_(0.5)
        ref = m(x)
    assert rel_err(our_forward(layer, t, x, 0.5), ref) <= 1e-5


def test_grouped_conv_matches_lycoris() -> None:
    for groups in (2, 32):  # blocks inside one group / blocks straddling groups
        layer = nn.Conv2d(64, 64, 3, padding=1, groups=groups)
        m = lyco_module(layer, 0.0, True)
        t = state_dict_copy(m)
        info = LayerInfo.from_module(layer)
        x = make_input(layer)
        with torch.no_grad():
            ref = m(x)
            byp = ALGO.bypass(
                x, layer(x), t, info, 1.0, base_weight=layer.weight.detach(), base_bias=layer.bias.detach()
            )
        assert rel_err(our_forward(layer, t, x), ref) <= 1e-5
        assert rel_err(byp, ref) <= 1e-5


# ------------------------------------------------------------------------------------------------- Lyco contract
def _random_tensors(info: LayerInfo, c: float, rescaled: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    t = ALGO.init_tensors(info, AdapterOptions(dim=4, constraint=c, rescaled=rescaled))
    t["oft_blocks"] = torch.randn_like(t["oft_blocks"]) * 0.3
    if rescaled:
        t["rescale"] = 1 + 0.2 * torch.randn_like(t["rescale"])
    return {k: v.to(dtype) if k != "alpha" else v for k, v in t.items()}


@pytest.mark.parametrize("name", ["linear64", "conv3x3", "conv1x1", "conv1d"])
@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("c", "rescaled"), [(0.0, False), (0.01, True)])
def test_bypass_equals_rebuild(name: str, mu: float, c: float, rescaled: bool) -> None:
    layer = LAYERS[name]().double()
    with torch.no_grad():
        layer.bias.normal_()  # a bias that matters
    info = LayerInfo.from_module(layer)
    t = _random_tensors(info, c, rescaled, torch.float64)
    x = make_input(layer).double()
    w, b = layer.weight.detach(), layer.bias.detach()
    new_w, new_b = ALGO.merge(w, b, t, info, mu)
    assert new_b is b  # the bias is never rotated
    rebuilt = info.forward(x, new_w, new_b)
    base_out = info.forward(x, w, b)
    byp = ALGO.bypass(x, base_out, t, info, mu, base_weight=w, base_bias=b)
    assert byp.dtype == torch.float64
    assert rel_err(byp, rebuilt) <= 1e-12
    if mu == 0.0:
        assert torch.equal(new_w, w)
        assert torch.equal(byp, base_out)
    else:
        assert rel_err(new_w, w) > 1e-3  # the adapter does something


def test_bypass_unbatched_conv_and_low_precision() -> None:
    layer = nn.Conv2d(16, 16, 3, padding=1)
    info = LayerInfo.from_module(layer)
    t = _random_tensors(info, 0.0, True, torch.float32)
    w, b = layer.weight.detach(), layer.bias.detach()
    x = torch.randn(16, 5, 5)  # unbatched input: channel axis 0
    rebuilt = info.forward(x, *ALGO.merge(w, b, t, info, 0.7))
    assert rel_err(ALGO.bypass(x, info.forward(x, w, b), t, info, 0.7, base_weight=w, base_bias=b), rebuilt) <= 1e-5
    # bf16 weights: Cayley in fp32, results come back in bf16
    wb, bb = w.bfloat16(), b.bfloat16()
    new_w, _ = ALGO.merge(wb, bb, t, info, 1.0)
    assert new_w.dtype == torch.bfloat16
    assert rel_err(new_w.float(), ALGO.merge(w, b, t, info, 1.0)[0]) <= 1e-2
    # float64 weights with float32 blocks: everything runs in float64
    t64 = {k: v.double() for k, v in t.items()}
    assert torch.equal(ALGO.merge(w.double(), None, t, info, 0.7)[0], ALGO.merge(w.double(), None, t64, info, 0.7)[0])


def test_rotation_is_orthogonal_and_constrained() -> None:
    blocks = torch.randn(16, 4, 4)
    r = cayley(blocks, 0.0)
    eye = torch.eye(4).expand(16, 4, 4)
    assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-5)
    # the clamp scales Q jointly so that ‖Q‖ = bound (up to the 1e-8)
    bound = 0.5
    q = blocks - blocks.transpose(1, 2)
    r_c = cayley(blocks, bound)
    qc = bound * q / (q.norm() + NORM_EPS)
    eye4 = torch.eye(4)
    assert torch.allclose(r_c, (eye4 + qc) @ torch.linalg.inv(eye4 - qc), atol=1e-6)
    # a rotation keeps the Frobenius norm of each row block of W
    layer = nn.Linear(8, 64)
    info = LayerInfo.from_module(layer)
    t = _random_tensors(info, 0.0, False, torch.float32)
    w2, _ = ALGO.merge(layer.weight.detach(), None, t, info)
    n0 = layer.weight.detach().reshape(16, 4, 8).norm(dim=(1, 2))
    assert torch.allclose(w2.reshape(16, 4, 8).norm(dim=(1, 2)), n0, rtol=1e-5)


def test_gradients_flow_from_zero_init() -> None:
    layer = nn.Linear(16, 16)
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(dim=4, rescaled=True, constraint=0.1))
    blocks = t["oft_blocks"].requires_grad_(True)
    rescale = t["rescale"].requires_grad_(True)
    x = torch.randn(3, 16)
    base = layer(x).detach()
    out = ALGO.bypass(
        x,
        base,
        {"oft_blocks": blocks, "rescale": rescale, "alpha": t["alpha"]},
        info,
        1.0,
        base_weight=layer.weight.detach(),
        base_bias=layer.bias.detach(),
    )
    assert torch.allclose(out, base, atol=1e-6)  # zero init = identity
    (out * torch.randn_like(out)).sum().backward()
    assert blocks.grad is not None
    assert float(blocks.grad.abs().sum()) > 0
    assert rescale.grad is not None
    assert float(rescale.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------------- registry, facts
def test_registry_and_detection() -> None:
    assert get("oft") is get("diag-oft")
    assert isinstance(get("diag_oft"), DiagOFT)
    t = ALGO.init_tensors(LayerInfo.linear(64, 64), AdapterOptions())
    assert detect(t).name == "diag-oft"
    assert detect({"oft_blocks": torch.zeros(5, 16, 4, 4), "alpha": torch.tensor(0.0)}).name == "boft"
    assert ALGO.additive is False
    assert ALGO.needs_base_weight is True
    assert ALGO.scalar_target is None
    assert ALGO.supports_dora is False


def test_describe_rank_scale() -> None:
    t = ALGO.init_tensors(LayerInfo.conv(64, 64, (3, 3)), AdapterOptions(constraint=0.25, rescaled=True))
    assert ALGO.rank(t) is None
    assert ALGO.scale(t) == 1.0
    assert ALGO.describe(t) == {
        "algo": "diag-oft",
        "block_size": 4,
        "block_num": 16,
        "constraint": 0.25,
        "rescaled": True,
    }


def test_check_options() -> None:
    info = LayerInfo.linear(64, 64)
    ALGO.check_options(AdapterOptions(), info)
    with pytest.raises(InvalidConfigError, match="dora"):
        ALGO.check_options(AdapterOptions(dora=True), info)
    with pytest.raises(InvalidConfigError, match="use_scalar"):
        ALGO.check_options(AdapterOptions(use_scalar=True), info)
    with pytest.raises(InvalidConfigError, match="norm"):
        ALGO.check_options(AdapterOptions(), LayerInfo("norm", 64, 64))


def test_validate() -> None:
    info = LayerInfo.conv(64, 32, (3, 3))
    good = ALGO.init_tensors(info, AdapterOptions(rescaled=True))
    ALGO.validate(good, info, "lora_unet_x")
    with pytest.raises(IncompatibleBaseError, match=r"lora_unet_x\.oft_blocks"):
        ALGO.validate({**good, "oft_blocks": torch.zeros(8, 4, 4)}, info, "lora_unet_x")
    with pytest.raises(CorruptFileError, match=r"lora_unet_x\.oft_blocks"):
        ALGO.validate({**good, "oft_blocks": torch.zeros(16, 4, 2)}, info, "lora_unet_x")
    with pytest.raises(CorruptFileError, match=r"lora_unet_x\.oft_blocks"):
        ALGO.validate({**good, "oft_blocks": torch.zeros(1, 16, 4, 4)}, info, "lora_unet_x")
    with pytest.raises(IncompatibleBaseError, match=r"lora_unet_x\.rescale"):
        ALGO.validate({**good, "rescale": torch.ones(32, 1, 1, 1)}, info, "lora_unet_x")
    with pytest.raises(CorruptFileError, match=r"lora_unet_x\.alpha"):
        ALGO.validate({**good, "alpha": torch.tensor(float("nan"))}, info, "lora_unet_x")
    with pytest.raises(CorruptFileError, match="lora_unet_x"):
        ALGO.validate({"alpha": good["alpha"]}, info, "lora_unet_x")
    with pytest.raises(IncompatibleBaseError, match="lora_unet_x"):
        ALGO.validate(good, LayerInfo("norm", 64, 64), "lora_unet_x")
