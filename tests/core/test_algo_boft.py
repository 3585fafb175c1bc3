"""BOFT against LyCORIS 4.1.3's ButterflyOFTModule, plus Lyco's own contract (bypass == rebuild, μ=0 == base)."""

from __future__ import annotations

import pytest
import torch
from checks import make_input, rel_err, state_dict_copy
from lycoris.modules.boft import ButterflyOFTModule
from torch import nn

from lyco_core.algorithms import detect, get
from lyco_core.algorithms.base import AdapterOptions
from lyco_core.algorithms.boft import BOFT, butterfly
from lyco_core.algorithms.oft import NORM_EPS, cayley
from lyco_core.errors import CorruptFileError, IncompatibleBaseError, InvalidConfigError
from lyco_core.layers import LayerInfo

ALGO = BOFT()

LAYERS = {
    "linear64": lambda: nn.Linear(64, 64),
    "linear320x1024": lambda: nn.Linear(320, 1024),
    "conv3x3": lambda: nn.Conv2d(64, 64, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(64, 64, 1),
    "conv1d": lambda: nn.Conv1d(32, 48, 3, padding=1),  # 48 = 6·8 blocks: b=6 with dim 8
}
DIMS = {"conv1d": 8}
VARIANTS = [(0.0, False), (0.01, True), (0.01, False), (100.0, True)]
# every variant on the small layers, the clamping rescaled one on the large layer (keeps the file fast)
CASES = [(n, c, r) for n in LAYERS for c, r in VARIANTS if n != "linear320x1024" or (c, r) == (0.01, True)]


def lyco_module(layer: nn.Module, c: float, rescaled: bool, mult: float = 1.0, dim: int = 4) -> ButterflyOFTModule:
    m = ButterflyOFTModule("k", layer, mult, lora_dim=dim, constraint=c, rescaled=rescaled)
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
    ("layer", "dim", "shape"),
    [
        (nn.Linear(64, 64), 4, (5, 16, 4, 4)),
        (nn.Linear(320, 1024), 4, (9, 256, 4, 4)),
        (nn.Conv2d(64, 64, 3), 4, (5, 16, 4, 4)),
        (nn.Conv2d(64, 64, 1), 4, (5, 16, 4, 4)),
        (nn.Conv2d(256, 256, 3), 4, (7, 64, 4, 4)),
        (nn.Linear(8, 320), 16, (6, 32, 10, 10)),
    ],
)
def test_spec9_shapes_and_lycoris_layout(layer: nn.Module, dim: int, shape: tuple[int, ...]) -> None:
    info = LayerInfo.from_module(layer)
    for rescaled in (False, True):
        t = ALGO.init_tensors(info, AdapterOptions(algo="boft", dim=dim, rescaled=rescaled))
        assert tuple(t["oft_blocks"].shape) == shape
        assert t["alpha"].ndim == 0
        assert t["alpha"].dtype == torch.float32
        ref = ButterflyOFTModule("k", layer, 1.0, lora_dim=dim, constraint=0.0, rescaled=rescaled).state_dict()
        assert set(ref) == set(t)
        for k, v in ref.items():
            assert tuple(v.shape) == tuple(t[k].shape), k
            assert torch.equal(v, t[k]), k


def test_no_valid_block_size() -> None:
    info = LayerInfo.linear(320, 320)
    with pytest.raises(InvalidConfigError, match="dim"):
        ALGO.init_tensors(info, AdapterOptions(algo="boft", dim=4))
    with pytest.raises(InvalidConfigError, match="dim"):
        ALGO.check_options(AdapterOptions(algo="boft", dim=4), info)
    with pytest.raises(ValueError):  # LyCORIS refuses it too
        ButterflyOFTModule("k", nn.Linear(320, 320), 1.0, lora_dim=4)
    ALGO.check_options(AdapterOptions(algo="boft", dim=16), info)


# ------------------------------------------------------------------------------------------------- vs LyCORIS
@pytest.mark.parametrize(("name", "c", "rescaled"), CASES)
def test_lycoris_tensors_match_lycoris_forward(name: str, c: float, rescaled: bool) -> None:
    layer = LAYERS[name]()
    m = lyco_module(layer, c, rescaled, dim=DIMS.get(name, 4))
    t = state_dict_copy(m)
    assert set(t) == {"oft_blocks", "alpha", *(["rescale"] if rescaled else [])}
    info = LayerInfo.from_module(layer)
    q = t["oft_blocks"] - t["oft_blocks"].transpose(-1, -2)
    if c == 0.01:
        assert float(q.norm()) + NORM_EPS > c * info.out_features  # the joint constraint clamps
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
    assert rel_err(ALGO.delta_weight(t, info, layer.weight.detach()), dw_ref) <= 1e-5


def test_block_size_ten_matches_lycoris() -> None:
    layer = nn.Linear(16, 320)  # p2fact(320, 16) = (10, 32): 6 stages of 32 blocks of 10
    m = lyco_module(layer, 0.0, True, dim=16)
    t = state_dict_copy(m)
    assert tuple(t["oft_blocks"].shape) == (6, 32, 10, 10)
    x = make_input(layer)
    with torch.no_grad():
        assert rel_err(our_forward(layer, t, x), m(x)) <= 1e-5


@pytest.mark.parametrize("name", ["linear64", "conv3x3"])
def test_our_init_loaded_into_lycoris(name: str) -> None:
    layer = LAYERS[name]()
    info = LayerInfo.from_module(layer)
    t = ALGO.init_tensors(info, AdapterOptions(algo="boft", dim=4, constraint=0.005, rescaled=True))
    t["oft_blocks"] = torch.randn_like(t["oft_blocks"]) * 0.3
    t["rescale"] = 1 + 0.2 * torch.randn_like(t["rescale"])
    m = ButterflyOFTModule("k", layer, 1.0, lora_dim=4, constraint=0.005, rescaled=True)
    m.load_state_dict(t)
    x = make_input(layer)
    with torch.no_grad():
        assert rel_err(our_forward(layer, t, x), m(x)) <= 1e-5


@pytest.mark.parametrize("name", ["linear64", "conv3x3", "conv1x1"])
def test_multiplier_half(name: str) -> None:
    layer = LAYERS[name]()
    x = make_input(layer)
    m = lyco_module(layer, 0.01, False, mult=0.5)
    with torch.no_grad():
        assert rel_err(our_forward(layer, state_dict_copy(m), x, 0.5), m(x)) <= 1e-5
    # Lyco interpolates the rescale too: equal to LyCORIS with rescale' = 0.5·rescale + 0.5
    m = lyco_module(layer, 0.01, True, mult=0.5)
    t = state_dict_copy(m)
    with torch.no_grad():
        m.rescale.mul_(0.5).add_(0.5)
        ref = m(x)
    assert rel_err(our_forward(layer, t, x, 0.5), ref) <= 1e-5


def test_grouped_conv_matches_lycoris() -> None:
    layer = nn.Conv2d(64, 64, 3, padding=1, groups=4)
    m = lyco_module(layer, 0.0, False)
    t = state_dict_copy(m)
    info = LayerInfo.from_module(layer)
    x = make_input(layer)
    with torch.no_grad():
        ref = m(x)
        byp = ALGO.bypass(x, layer(x), t, info, 1.0, base_weight=layer.weight.detach(), base_bias=layer.bias.detach())
    assert rel_err(our_forward(layer, t, x), ref) <= 1e-5
    assert rel_err(byp, ref) <= 1e-5


# ------------------------------------------------------------------------------------------------- Lyco contract
def _random_tensors(info: LayerInfo, c: float, rescaled: bool, dim: int = 4) -> dict[str, torch.Tensor]:
    t = ALGO.init_tensors(info, AdapterOptions(algo="boft", dim=dim, constraint=c, rescaled=rescaled))
    t["oft_blocks"] = torch.randn_like(t["oft_blocks"]).double() * 0.3
    if rescaled:
        t["rescale"] = 1 + 0.2 * torch.randn_like(t["rescale"]).double()
    return t


@pytest.mark.parametrize("name", ["linear64", "conv3x3", "conv1x1", "conv1d"])
@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("c", "rescaled"), [(0.0, False), (0.01, True)])
def test_bypass_equals_rebuild(name: str, mu: float, c: float, rescaled: bool) -> None:
    layer = LAYERS[name]().double()
    with torch.no_grad():
        layer.bias.normal_()
    info = LayerInfo.from_module(layer)
    t = _random_tensors(info, c, rescaled, DIMS.get(name, 4))
    x = make_input(layer).double()
    w, b = layer.weight.detach(), layer.bias.detach()
    new_w, new_b = ALGO.merge(w, b, t, info, mu)
    assert new_b is b
    rebuilt = info.forward(x, new_w, new_b)
    base_out = info.forward(x, w, b)
    byp = ALGO.bypass(x, base_out, t, info, mu, base_weight=w, base_bias=b)
    assert rel_err(byp, rebuilt) <= 1e-12
    if mu == 0.0:
        assert torch.equal(new_w, w)
        assert torch.equal(byp, base_out)
    else:
        assert rel_err(new_w, w) > 1e-3


def test_butterfly_is_a_product_of_permuted_block_diagonals() -> None:
    """Build every stage as an explicit O×O matrix P_iᵀ·diag(R_i)·P_i and compare with :func:`butterfly`."""
    m, n, b = 4, 8, 4
    size = n * b
    r = cayley(torch.randn(m, n, b, b, dtype=torch.float64), 0.0)
    total = torch.eye(size, dtype=torch.float64)
    for i in range(m):
        k = (1 << i) * (b // 2)
        perm = torch.arange(size).reshape(-1, 2, k).transpose(1, 2).reshape(-1)  # new position → old channel
        p = torch.eye(size, dtype=torch.float64)[perm]
        stage = p.T @ torch.block_diag(*r[i]) @ p
        total = stage @ total
    v = torch.randn(3, size, dtype=torch.float64)
    assert torch.allclose(butterfly(v, r), v @ total.T, atol=1e-12)
    assert torch.allclose(total @ total.T, torch.eye(size, dtype=torch.float64), atol=1e-10)


# ------------------------------------------------------------------------------------------------- registry, facts
def test_registry_and_detection() -> None:
    assert isinstance(get("boft"), BOFT)
    t = ALGO.init_tensors(LayerInfo.linear(64, 64), AdapterOptions(algo="boft"))
    assert detect(t).name == "boft"
    assert ALGO.additive is False
    assert ALGO.needs_base_weight is True
    assert ALGO.scalar_target is None


def test_describe_rank_scale() -> None:
    t = ALGO.init_tensors(LayerInfo.linear(1024, 320), AdapterOptions(algo="boft", constraint=0.5))
    assert ALGO.rank(t) is None
    assert ALGO.scale(t) == 1.0
    assert ALGO.describe(t) == {
        "algo": "boft",
        "block_size": 4,
        "block_num": 256,
        "stages": 9,
        "constraint": 0.5,
        "rescaled": False,
    }


def test_validate() -> None:
    info = LayerInfo.linear(64, 32)
    good = ALGO.init_tensors(info, AdapterOptions(algo="boft", rescaled=True))
    ALGO.validate(good, info, "lora_te_x")
    ALGO.validate({**good, "oft_blocks": torch.zeros(3, 16, 4, 4)}, info, "lora_te_x")  # fewer stages is fine
    with pytest.raises(IncompatibleBaseError, match=r"lora_te_x\.oft_blocks"):
        ALGO.validate({**good, "oft_blocks": torch.zeros(5, 8, 4, 4)}, info, "lora_te_x")
    with pytest.raises(CorruptFileError, match=r"lora_te_x\.oft_blocks"):
        ALGO.validate({**good, "oft_blocks": torch.zeros(6, 16, 4, 4)}, info, "lora_te_x")  # too many stages
    ALGO.validate({**good, "oft_blocks": torch.zeros(2, 8, 8, 8)}, info, "lora_te_x")  # another valid layout
    with pytest.raises(CorruptFileError, match=r"lora_te_x\.oft_blocks"):  # 12 blocks: not a power of two
        ALGO.validate({"oft_blocks": torch.zeros(2, 12, 4, 4)}, LayerInfo.linear(48, 8), "lora_te_x")
    with pytest.raises(CorruptFileError, match=r"lora_te_x\.oft_blocks"):
        ALGO.validate({**good, "oft_blocks": torch.zeros(1, 64, 1, 1)}, info, "lora_te_x")  # odd block size
    with pytest.raises(CorruptFileError, match=r"lora_te_x\.oft_blocks"):
        ALGO.validate({**good, "oft_blocks": torch.zeros(16, 4, 4)}, info, "lora_te_x")  # Diag-OFT layout
    with pytest.raises(IncompatibleBaseError, match=r"lora_te_x\.rescale"):
        ALGO.validate({**good, "rescale": torch.ones(63, 1)}, info, "lora_te_x")
