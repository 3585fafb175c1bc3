"""LoKr against LyCORIS 4.1.3's LokrModule forward, plus bypass == rebuild and file checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from lycoris.modules.lokr import LokrModule
from torch import nn

from lyco_core.algorithms import detect, get
from lyco_core.algorithms.base import AdapterOptions
from lyco_core.algorithms.dora import dora_merge
from lyco_core.algorithms.lokr import LoKr, W2Factors, kron_bypass, kron_delta, w2_goes_first
from lyco_core.errors import CorruptFileError, IncompatibleBaseError
from lyco_core.layers import LayerInfo

ALGO = LoKr()
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """One intra-op thread: on a shared, loaded CPU that is many times faster than two (and deterministic)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# (id, base layer factory, input factory, LyCORIS kwargs, expected file shapes or None)
Case = tuple[str, Callable[[], nn.Module], Callable[[], torch.Tensor], dict, dict | None]


def _lin(o: int, i: int) -> Callable[[], nn.Module]:
    return lambda: nn.Linear(i, o)


def _conv(o: int, i: int, k: int, **kw: object) -> Callable[[], nn.Module]:
    return lambda: nn.Conv2d(i, o, k, **kw)  # type: ignore[arg-type]


def _x(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape)


CASES: list[Case] = [
    ("lin-default", _lin(1024, 320), _x(3, 320), {}, {"lokr_w1": (32, 16), "lokr_w2_a": (32, 4), "lokr_w2_b": (4, 20)}),
    (
        "lin-f8-alpha3",
        _lin(1024, 320),
        _x(2, 5, 320),
        {"factor": 8, "alpha": 3.0},
        {"lokr_w1": (8, 8), "lokr_w2_a": (128, 4), "lokr_w2_b": (4, 40)},
    ),
    ("lin-f16-alpha0", _lin(1024, 320), _x(3, 320), {"factor": 16, "alpha": 0}, None),
    (
        "lin-decompose-both",
        _lin(1024, 320),
        _x(3, 320),
        {"factor": 16, "lora_dim": 2, "decompose_both": True},
        {"lokr_w1_a": (16, 2), "lokr_w1_b": (2, 16), "lokr_w2_a": (64, 2), "lokr_w2_b": (2, 20)},
    ),
    (
        "lin-full-dim",
        _lin(1024, 320),
        _x(3, 320),
        {"factor": 8, "lora_dim": 100000},
        {"lokr_w1": (8, 8), "lokr_w2": (128, 40)},
    ),
    (
        "lin-full-matrix",
        _lin(1024, 320),
        _x(3, 320),
        {"factor": 8, "full_matrix": True, "alpha": 2.0},
        {"lokr_w1": (8, 8), "lokr_w2": (128, 40)},
    ),
    (
        "lin-unbalanced",
        _lin(1024, 320),
        _x(3, 320),
        {"factor": 8, "unbalanced_factorization": True},
        {"lokr_w1": (128, 8), "lokr_w2_a": (8, 4), "lokr_w2_b": (4, 40)},
    ),
    ("lin-rs", _lin(64, 64), _x(3, 64), {"lora_dim": 2, "alpha": 4.0, "rs_lora": True}, None),
    (
        "conv3-s2p1",
        _conv(256, 256, 3, stride=2, padding=1),
        _x(2, 256, 9, 9),
        {},
        {"lokr_w1": (16, 16), "lokr_w2_a": (16, 4), "lokr_w2_b": (4, 144)},
    ),
    (
        "conv3-tucker",
        _conv(256, 256, 3, padding=1),
        _x(2, 256, 6, 6),
        {"use_tucker": True, "alpha": 2.0},
        {"lokr_w1": (16, 16), "lokr_t2": (4, 4, 3, 3), "lokr_w2_a": (4, 16), "lokr_w2_b": (4, 16)},
    ),
    (
        "conv3-decompose-both",
        _conv(256, 256, 3, stride=2, padding=1),
        _x(2, 256, 7, 7),
        {"factor": 16, "lora_dim": 2, "decompose_both": True},
        None,
    ),
    ("conv3-full", _conv(64, 64, 3, padding=1), _x(2, 64, 6, 6), {}, {"lokr_w1": (8, 8), "lokr_w2": (8, 8, 3, 3)}),
    ("conv1x1", _conv(96, 64, 1), _x(2, 64, 5, 5), {"lora_dim": 2}, None),
    ("conv1x1-full", _conv(64, 64, 1), _x(2, 64, 5, 5), {}, {"lokr_w1": (8, 8), "lokr_w2": (8, 8, 1, 1)}),
    ("conv1d", lambda: nn.Conv1d(64, 96, 3, padding=1), _x(2, 64, 7), {"lora_dim": 2}, None),
    ("conv1d-tucker", lambda: nn.Conv1d(64, 96, 3, stride=2), _x(2, 64, 9), {"lora_dim": 2, "use_tucker": True}, None),
    ("conv-grouped", _conv(64, 64, 3, padding=1, groups=2), _x(2, 64, 5, 5), {"lora_dim": 2}, None),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _lycoris(base: nn.Module, **kw: object) -> LokrModule:
    """A LyCORIS LoKr module on ``base`` with every parameter randomised (its init leaves zeros)."""
    kw = {"lora_dim": 4, "alpha": 1.0, **kw}
    m = LokrModule("test", base, **kw)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if n == "dora_scale" else torch.randn_like(p) * 0.3)
    return m


def _file(m: LokrModule) -> dict[str, torch.Tensor]:
    """What LyCORIS saves for this module (its custom state dict)."""
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _ours(x: torch.Tensor, base: nn.Module, t: dict[str, torch.Tensor], mu: float) -> tuple[torch.Tensor, ...]:
    """(merge forward, bypass forward) at μ."""
    layer = LayerInfo.from_module(base)
    bias = base.bias.detach() if base.bias is not None else None
    w, b = ALGO.merge(base.weight.detach(), bias, t, layer, mu)
    merged = layer.forward(x, w, b)
    byp = ALGO.bypass(x, base(x), t, layer, mu, base_weight=base.weight.detach(), base_bias=bias)
    return merged, byp


# --------------------------------------------------------------------------- (a) LyCORIS files → our forward
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lycoris_file_matches_lycoris_forward(case: Case) -> None:
    _, make_base, make_x, kw, shapes = case
    base = make_base()
    m = _lycoris(base, **kw)
    t = _file(m)
    if shapes is not None:
        assert {k: tuple(v.shape) for k, v in t.items() if k != "alpha"} == shapes
    layer = LayerInfo.from_module(base)
    ALGO.validate(t, layer, "k")
    assert ALGO.matches(t)
    assert detect(t).name == "lokr"
    x = make_x()
    with torch.no_grad():
        for mu in (1.0, 0.5):
            m.multiplier = mu
            ref = m(x)
            merged, byp = _ours(x, base, t, mu)
            assert _rel(merged, ref) < 1e-5
            assert _rel(byp, ref) < 1e-5
        # float64: the same numbers to rounding
        base64, m64, t64, x64 = base.to(F64), m.to(F64), {k: v.to(F64) for k, v in t.items()}, x.to(F64)
        ref = m64(x64)
        merged, byp = _ours(x64, base64, t64, 0.5)
        # rs-LoRA: the file's alpha α·√r is rounded to float32, LyCORIS's own scale is not
        tol = 1e-7 if kw.get("rs_lora") else 1e-12
        assert _rel(merged, ref) < tol
        assert _rel(byp, ref) < tol
        # ΔW itself (LyCORIS's forward uses get_weight, scaled once)
        assert _rel(ALGO.delta_weight(t64, layer), m64.get_weight(m64.shape) * m64.scalar) < tol
        assert ALGO.scale(t) == pytest.approx(m.scale)


def test_full_dimension_scale_is_one() -> None:
    m = _lycoris(nn.Linear(320, 1024), factor=8, lora_dim=100000)
    t = _file(m)
    assert float(t["alpha"]) == 100000
    assert ALGO.rank(t) is None
    assert ALGO.scale(t) == 1.0
    layer = LayerInfo.linear(1024, 320)
    expected = torch.kron(t["lokr_w1"], t["lokr_w2"])
    assert torch.equal(ALGO.delta_weight(t, layer), expected)


@pytest.mark.parametrize("on_output", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dora_matches_lycoris(on_output: bool, kind: str) -> None:
    if kind == "linear":
        base, x, kw = nn.Linear(320, 1024), torch.randn(3, 320), {"factor": 8, "alpha": 2.0}
    else:
        base, x, kw = nn.Conv2d(64, 96, 3, padding=1), torch.randn(2, 64, 6, 6), {"lora_dim": 2, "use_tucker": True}
    m = _lycoris(base, weight_decompose=True, wd_on_out=on_output, **kw)
    t = _file(m)
    layer = LayerInfo.from_module(base)
    ALGO.validate(t, layer, "k")
    assert ALGO.describe(t)["dora"] == ("output" if on_output else "input")
    w = base.weight.detach()
    with torch.no_grad():
        ref = m(x)
        ours = layer.forward(x, dora_merge(w, ALGO.delta_weight(t, layer), t["dora_scale"], 1.0), base.bias)
        assert _rel(ours, ref) < 1e-5
        # μ = 0 gives the base weights back (Lyco semantics; LyCORIS gives W + ΔW there)
        assert torch.equal(dora_merge(w, ALGO.delta_weight(t, layer), t["dora_scale"], 0.0), w)


# --------------------------------------------------------------------------- (b) our init → LyCORIS module
INIT_CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], torch.Tensor], dict]] = [
    ("lin-default", _lin(1024, 320), _x(3, 320), {}),
    ("lin-f8-a2", _lin(1024, 320), _x(3, 320), {"factor": 8, "alpha": 2.0}),
    ("lin-decompose-both", _lin(1024, 320), _x(3, 320), {"factor": 16, "dim": 2, "decompose_both": True}),
    ("lin-full-dim", _lin(1024, 320), _x(3, 320), {"factor": 8, "dim": 100000}),
    ("lin-full-matrix", _lin(1024, 320), _x(3, 320), {"factor": 8, "full_matrix": True}),
    ("lin-unbalanced", _lin(1024, 320), _x(3, 320), {"factor": 8, "unbalanced_factorization": True}),
    ("lin-rs", _lin(1024, 320), _x(3, 320), {"dim": 2, "alpha": 4.0, "rs_lora": True}),
    ("conv3-tucker", _conv(256, 256, 3, padding=1), _x(1, 256, 5, 5), {"use_tucker": True}),
    ("conv3-lowrank", _conv(256, 256, 3, stride=2), _x(1, 256, 7, 7), {"alpha": 0.0}),
    ("conv3-full", _conv(64, 64, 3), _x(1, 64, 5, 5), {}),
    ("conv1x1-tucker", _conv(96, 64, 1), _x(1, 64, 4, 4), {"dim": 2, "use_tucker": True}),
    (
        "conv1d-decompose-both",
        lambda: nn.Conv1d(256, 256, 3),
        _x(2, 256, 6),
        {"factor": 16, "dim": 2, "decompose_both": True},
    ),
]

_LYCO_KW = {"dim": "lora_dim", "unbalanced_factorization": "unbalanced_factorization"}


@pytest.mark.parametrize("case", INIT_CASES, ids=[c[0] for c in INIT_CASES])
@pytest.mark.parametrize("use_scalar", [False, True])
def test_our_init_loads_into_lycoris(case: tuple, use_scalar: bool) -> None:
    _, make_base, make_x, kw = case
    base = make_base()
    layer = LayerInfo.from_module(base)
    opts = AdapterOptions(algo="lokr", use_scalar=use_scalar, **{"dim": 4, "alpha": 1.0, **kw})
    ALGO.check_options(opts, layer)
    t = ALGO.init_tensors(layer, opts)
    ALGO.validate(t, layer, "k")
    lyco_kw = {_LYCO_KW.get(k, k): v for k, v in {"dim": 4, "alpha": 1.0, **kw}.items()}
    m = LokrModule("test", base, use_scalar=use_scalar, **lyco_kw)
    lyco_file = _file(m)
    # same tensor names and shapes, same alpha
    assert {k: tuple(v.shape) for k, v in t.items()} == {k: tuple(v.shape) for k, v in lyco_file.items()}
    assert float(t["alpha"]) == pytest.approx(float(lyco_file["alpha"]))
    assert all(v.dtype == torch.float32 for v in t.values())
    # init rule: ΔW = 0 unless use_scalar, in which case no tensor is zero
    zero = [k for k, v in t.items() if k != "alpha" and not v.any()]
    assert zero == ([] if use_scalar else [k for k in ("lokr_w2", "lokr_w2_b") if k in t])
    target = ALGO.scalar_target_for(t)
    assert target == ("lokr_w1_a" if "lokr_w1_a" in t else "lokr_w1")
    # randomise ours, load into LyCORIS, compare forwards
    t = {k: (v if k == "alpha" else torch.randn_like(v) * 0.3) for k, v in t.items()}
    m.load_state_dict(t)  # its load hook sets the scalar to 1
    x = make_x()
    with torch.no_grad():
        ref = m(x)
        merged, byp = _ours(x, base, t, 1.0)
    assert _rel(merged, ref) < 1e-5
    assert _rel(byp, ref) < 1e-5


# --------------------------------------------------------------------------- (c) bypass == rebuild
BYPASS_LAYERS = {
    "linear": (lambda: LayerInfo.linear(1024, 320, bias=True), (2, 3, 320)),
    "linear-w1-first": (lambda: LayerInfo.linear(32, 128), (4, 128)),
    "linear-rebuilt-w2": (lambda: LayerInfo.linear(8, 40), (3, 40)),
    "conv3-s2p1": (lambda: LayerInfo.conv(256, 256, (3, 3), stride=(2, 2), padding=(1, 1)), (2, 256, 7, 7)),
    "conv3-w1-first": (lambda: LayerInfo.conv(32, 128, (3, 3), padding=(1, 1)), (2, 128, 5, 5)),
    "conv3-dil-unbatched": (lambda: LayerInfo.conv(64, 64, (3, 3), dilation=(2, 2), padding=(2, 2)), (64, 6, 6)),
    "conv-same": (lambda: LayerInfo.conv(64, 64, (3, 3), padding="same"), (1, 64, 6, 6)),
    "conv1x1": (lambda: LayerInfo.conv(96, 64, (1, 1)), (2, 64, 4, 4)),
    "conv1d": (lambda: LayerInfo.conv(96, 64, (3,), stride=(2,), padding=(1,)), (2, 64, 9)),
    "conv3d": (lambda: LayerInfo.conv(32, 32, (3, 1, 3), padding=(1, 0, 1)), (1, 32, 3, 4, 4)),
    "conv-grouped": (lambda: LayerInfo.conv(64, 64, (3, 3), padding=(1, 1), groups=4), (2, 64, 5, 5)),
}
VARIANTS = {
    "default": {},
    "lowrank-r3": {"dim": 3},
    "f8": {"factor": 8},
    "decompose-both": {"factor": 16, "dim": 2, "decompose_both": True},
    "full-dim": {"dim": 100000},
    "full-matrix": {"full_matrix": True, "factor": 4},
    "unbalanced": {"unbalanced_factorization": True, "factor": 4},
    "tucker": {"use_tucker": True, "dim": 2},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layer_id", list(BYPASS_LAYERS))
def test_bypass_equals_rebuild(layer_id: str, variant: str) -> None:
    make_layer, x_shape = BYPASS_LAYERS[layer_id]
    layer = make_layer()
    opts = AdapterOptions(algo="lokr", use_scalar=True, alpha=3.0, **VARIANTS[variant])
    t = {k: v.to(F64) for k, v in ALGO.init_tensors(layer, opts).items()}
    ALGO.validate(t, layer, "k")
    w = torch.randn(layer.weight_shape, dtype=F64)
    b = torch.randn(layer.out_features, dtype=F64) if layer.has_bias else None
    x = torch.randn(x_shape, dtype=F64)
    base_out = layer.forward(x, w, b)
    for mu in (0.0, 0.5, 1.0):
        rebuilt = layer.forward(x, *ALGO.merge(w, b, t, layer, mu))
        byp = ALGO.bypass(x, base_out, t, layer, mu, base_weight=w, base_bias=b)
        assert byp.shape == rebuilt.shape
        assert _rel(byp, rebuilt) < 1e-12, mu
        if mu == 0.0:
            assert torch.equal(ALGO.merge(w, b, t, layer, mu)[0], w)
            assert _rel(byp, base_out) < 1e-15


def test_both_application_orders_are_exercised() -> None:
    # (O₁, I₁, O₂, I₂): 128→32 linear is (4, 8, 8, 16), where w1 first is cheaper
    assert not w2_goes_first(4, 8, 8, 16, chain=4 * 16 + 8 * 4, p_in=1, p_out=1)
    # unbalanced 320→1024 at factor 8 is (128, 8, 8, 40): the second half first
    assert w2_goes_first(128, 8, 8, 40, chain=4 * 40 + 8 * 4, p_in=1, p_out=1)
    # the kron identity holds for both orders on a conv with stride
    layer = LayerInfo.conv(32, 128, (3, 3), stride=(2, 2), padding=(1, 1))
    w1, w2 = torch.randn(4, 8, dtype=F64), torch.randn(8, 16, 3, 3, dtype=F64)
    x = torch.randn(2, 128, 7, 7, dtype=F64)
    assert not w2_goes_first(4, 8, 8, 16, chain=16 * 8 * 9 * 16, p_in=49, p_out=16)
    ref = layer.forward(x, kron_delta(w1, w2, 1.0))
    assert _rel(kron_bypass(x, w1, W2Factors(w2), layer), ref) < 1e-12
    # O₁ > I₁: the second half goes first
    w1t, layer2, x2 = w1.T.contiguous(), LayerInfo.conv(64, 64, (3, 3)), torch.randn(2, 64, 7, 7, dtype=F64)
    assert w2_goes_first(8, 4, 8, 16, chain=16 * 8 * 9 * 25, p_in=49, p_out=25)
    assert _rel(kron_bypass(x2, w1t, W2Factors(w2), layer2), layer2.forward(x2, kron_delta(w1t, w2, 1.0))) < 1e-12


def test_kron_delta_is_torch_kron() -> None:
    w1, w2 = torch.randn(3, 5), torch.randn(4, 2, 3, 3)
    assert torch.allclose(kron_delta(w1, w2, 0.5), 0.5 * torch.kron(w1[:, :, None, None], w2))


# --------------------------------------------------------------------------- (d) validate
def _sample(**kw: object) -> dict[str, torch.Tensor]:
    return ALGO.init_tensors(LayerInfo.linear(1024, 320), AdapterOptions(algo="lokr", **kw))  # type: ignore[arg-type]


def test_validate_errors_name_the_key() -> None:
    lin = LayerInfo.linear(1024, 320)
    with pytest.raises(IncompatibleBaseError, match="mod_a"):
        ALGO.validate(_sample(), LayerInfo.linear(512, 320), "mod_a")
    with pytest.raises(IncompatibleBaseError, match="mod_b"):
        ALGO.validate(_sample(), LayerInfo.conv(1024, 320, (3, 3)), "mod_b")
    t = _sample(factor=16, dim=2, decompose_both=True)
    t["lokr_w1_b"] = torch.zeros(3, 16)
    with pytest.raises(CorruptFileError, match=r"mod_c.*lokr_w1_a"):
        ALGO.validate(t, lin, "mod_c")
    t = _sample()
    t["lokr_w2_a"] = torch.zeros(32, 5)
    with pytest.raises(CorruptFileError, match="mod_d"):
        ALGO.validate(t, lin, "mod_d")
    t = _sample()
    del t["lokr_w2_b"]
    with pytest.raises(CorruptFileError, match=r"mod_e\.lokr_w2_b"):
        ALGO.validate(t, lin, "mod_e")
    conv = LayerInfo.conv(256, 256, (3, 3))
    t = ALGO.init_tensors(conv, AdapterOptions(algo="lokr", use_tucker=True))
    with pytest.raises(IncompatibleBaseError, match=r"mod_f\.lokr_t2"):
        ALGO.validate(t, LayerInfo.conv(256, 256, (5, 5)), "mod_f")
    t["lokr_t2"] = torch.zeros(4, 3, 3, 3)
    with pytest.raises(CorruptFileError, match="mod_g"):
        ALGO.validate(t, conv, "mod_g")
    t = ALGO.init_tensors(conv, AdapterOptions(algo="lokr"))
    with pytest.raises(IncompatibleBaseError, match=r"mod_h\.lokr_w2_b"):
        ALGO.validate(t, LayerInfo.conv(256, 256, (5, 5)), "mod_h")
    t = _sample()
    t["dora_scale"] = torch.ones(7, 1)
    with pytest.raises(IncompatibleBaseError, match=r"mod_i\.dora_scale"):
        ALGO.validate(t, lin, "mod_i")


# --------------------------------------------------------------------------- (e) file facts
def test_describe_rank_scale_registry() -> None:
    t = _sample(factor=16, dim=2, alpha=1.0, decompose_both=True)
    assert ALGO.rank(t) == 2
    assert ALGO.scale(t) == 0.5
    assert ALGO.describe(t) == {"algo": "lokr", "rank": 2, "alpha": 1.0, "w1": "low-rank", "w2": "low-rank"}
    assert ALGO.scalar_target_for(t) == "lokr_w1_a"
    t = _sample(factor=8, dim=100000)
    assert ALGO.describe(t) == {"algo": "lokr", "alpha": 100000.0, "w1": "full", "w2": "full"}
    assert ALGO.scale(t) == 1.0
    assert ALGO.scalar_target_for(t) == ALGO.scalar_target == "lokr_w1"
    conv = LayerInfo.conv(256, 256, (3, 3))
    t = ALGO.init_tensors(conv, AdapterOptions(algo="lokr", use_tucker=True, dim=4, alpha=2.0))
    assert ALGO.describe(t)["w2"] == "tucker"
    assert ALGO.rank(t) == 4
    assert ALGO.scale(t) == 0.5
    assert get("kron") is get("lokr")
    assert isinstance(get("lokr"), LoKr)
