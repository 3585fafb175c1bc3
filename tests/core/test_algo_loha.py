"""LoHa: layouts, math and numbers against LyCORIS 4.1.3's LohaModule forward."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from checks import rel_err
from lycoris.modules.loha import LohaModule
from torch import nn

from lyco_core import algorithms
from lyco_core.algorithms import dora
from lyco_core.algorithms.base import AdapterOptions
from lyco_core.algorithms.loha import HadaProduct, HadaTuckerProduct, LoHa, loha_delta, loha_delta_tucker
from lyco_core.errors import CorruptFileError, IncompatibleBaseError
from lyco_core.layers import LayerInfo

ALGO = LoHa()
F64 = torch.float64

# name → (layer factory, input shape, use_tucker)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
    "linear": (lambda: nn.Linear(12, 10, bias=True), (3, 12), False),
    "conv3x3": (lambda: nn.Conv2d(6, 8, 3, padding=1, bias=True), (2, 6, 7, 7), False),
    "conv3x3_tucker": (lambda: nn.Conv2d(6, 8, 3, padding=1, bias=True), (2, 6, 7, 7), True),
    "conv1x1": (lambda: nn.Conv2d(6, 8, 1, bias=False), (2, 6, 5, 5), True),  # Tucker never applies to 1x1
    "conv_strided_grouped": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), (2, 6, 9, 9), False),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 11), False),
    "conv1d_tucker": (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 11), True),
    "conv3d_tucker": (lambda: nn.Conv3d(4, 6, (3, 1, 3), padding=(1, 0, 1)), (1, 4, 5, 3, 5), True),
}


# ------------------------------------------------------------------------------------------ helpers


def make_case(name: str, dtype: torch.dtype = F64) -> tuple[nn.Module, torch.Tensor, LayerInfo, bool]:
    factory, x_shape, tucker = CASES[name]
    layer = factory().to(dtype)
    return layer, torch.randn(*x_shape, dtype=dtype), LayerInfo.from_module(layer), tucker


def lycoris_module(layer: nn.Module, dim: int = 4, alpha: float = 1.0, **kw: object) -> LohaModule:
    mod = LohaModule("lycoris_test", layer, 1.0, dim, alpha, **kw)
    return mod.to(layer.weight.dtype)


@torch.no_grad()
def randomize(mod: LohaModule) -> None:
    """LyCORIS zero-inits hada_w2_a; give every factor a value of order one so ΔW is comparable to W."""
    for name, p in mod.named_parameters():
        if name.startswith("hada_"):
            p.copy_(torch.randn_like(p) * (0.5 if name.endswith("_a") else 0.7))
        elif name == "dora_scale":
            p.mul_(1 + 0.2 * torch.rand_like(p))


def saved_tensors(mod: LohaModule) -> dict[str, torch.Tensor]:
    """The tensors LyCORIS writes to a file for this module."""
    return {k: v.detach().clone() for k, v in mod.custom_state_dict().items()}


def ours(layer: nn.Module, x: torch.Tensor, t: dict[str, torch.Tensor], mu: float, bypass: bool) -> torch.Tensor:
    info = LayerInfo.from_module(layer)
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    if bypass:
        return ALGO.bypass(x, info.forward(x, w, b), t, info, mu, base_weight=w, base_bias=b)
    return info.forward(x, *ALGO.merge(w, b, t, info, mu))


def delta_err(layer: nn.Module, x: torch.Tensor, got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error on the adapter's part of the output (stricter than on the whole output)."""
    base = layer(x).detach()
    return rel_err(got - base, ref - base)


# ------------------------------------------------------------------------------------------ (a) LyCORIS files
@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_tensors_match_lycoris_forward(case: str) -> None:
    """α=1, r=4 (α≠r, where LyCORIS's merge is wrong): our merge and bypass equal LyCORIS's forward."""
    layer, x, info, tucker = make_case(case)
    mod = lycoris_module(layer, dim=4, alpha=1.0, use_tucker=tucker)
    randomize(mod)
    t = saved_tensors(mod)
    assert set(t) == {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} | (
        {"hada_t1", "hada_t2"} if tucker and not info.is_pointwise else set()
    )
    assert ALGO.rank(t) == 4
    assert ALGO.scale(t) == pytest.approx(0.25)
    ALGO.validate(t, info, "k")
    for mu in (1.0, 0.5):
        mod.multiplier = mu
        with torch.no_grad():
            ref = mod(x)
        for bypass in (False, True):
            assert delta_err(layer, x, ours(layer, x, t, mu, bypass), ref) < 1e-12, (case, mu, bypass)


@pytest.mark.parametrize("case", ["linear", "conv3x3_tucker", "conv1d"])
def test_lycoris_tensors_fp32(case: str) -> None:
    layer, x, _, tucker = make_case(case, torch.float32)
    mod = lycoris_module(layer, dim=4, alpha=1.0, use_tucker=tucker)
    randomize(mod)
    t = saved_tensors(mod)
    with torch.no_grad():
        ref = mod(x)
    for bypass in (False, True):
        assert delta_err(layer, x, ours(layer, x, t, 1.0, bypass), ref) < 1e-5


def test_lycoris_merge_applies_scale_twice() -> None:
    """Documents spec §2.14.1: LyCORIS's merged ΔW is (α/r)²·raw; ours is (α/r)·raw like its forward."""
    layer, _, info, _ = make_case("linear")
    mod = lycoris_module(layer, dim=4, alpha=1.0)
    randomize(mod)
    t = saved_tensors(mod)
    with torch.no_grad():
        lyco_merged, _ = mod.get_merged_weight(multiplier=1.0)
    ours_dw = ALGO.delta_weight(t, info)
    assert rel_err(lyco_merged - layer.weight.detach(), 0.25 * ours_dw) < 1e-12


def test_make_module_from_state_dict_roundtrip() -> None:
    """LyCORIS's own loader, given our tensors, builds a module whose forward equals ours."""
    layer, x, info, _ = make_case("conv3x3_tucker")
    t = ALGO.init_tensors(info, AdapterOptions(algo="loha", dim=3, alpha=2.0, use_tucker=True))
    t = {k: (v if k == "alpha" else torch.randn_like(v)).to(F64) for k, v in t.items()}
    args = [t.get(k) for k in LohaModule.weight_list]
    with torch.no_grad():
        mod = LohaModule.make_module_from_state_dict("lycoris_test", layer, *args).to(F64)
        ref = mod(x)
    assert delta_err(layer, x, ours(layer, x, t, 1.0, False), ref) < 1e-12


# ------------------------------------------------------------------------------------------ (b) our init in LyCORIS
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("rs_lora", "use_scalar"), [(False, False), (True, False), (False, True)])
def test_our_init_loads_into_lycoris(case: str, rs_lora: bool, use_scalar: bool) -> None:
    layer, x, info, tucker = make_case(case)
    opts = AdapterOptions(algo="loha", dim=4, alpha=2.0, use_tucker=tucker, rs_lora=rs_lora, use_scalar=use_scalar)
    t = ALGO.init_tensors(info, opts)
    mod = lycoris_module(layer, dim=4, alpha=2.0, use_tucker=tucker, rs_lora=rs_lora, use_scalar=use_scalar)
    lyco = saved_tensors(mod)
    assert {k: tuple(v.shape) for k, v in t.items()} == {k: tuple(v.shape) for k, v in lyco.items()}
    assert all(v.dtype == torch.float32 for v in t.values())
    assert float(t["alpha"]) == pytest.approx(float(lyco["alpha"]))
    assert float(t["alpha"]) == pytest.approx(2.0 * math.sqrt(4) if rs_lora else 2.0)
    # fresh init: ΔW = 0 (the module's scalar starts at 0 when use_scalar)
    dw = ALGO.delta_weight(t, info)
    assert torch.count_nonzero(dw) > 0 if use_scalar else torch.count_nonzero(dw) == 0
    # random values (w2_a is zero at init) loaded through LyCORIS's state-dict path
    t = {k: (v if k == "alpha" else torch.randn_like(v) * 0.6).to(F64) for k, v in t.items()}
    mod.load_state_dict(t, strict=True)
    assert float(mod.scalar.detach()) == 1.0
    with torch.no_grad():
        ref = mod(x)
    assert delta_err(layer, x, ours(layer, x, t, 1.0, False), ref) < 1e-12


def test_init_distributions() -> None:
    info = LayerInfo.conv(64, 48, (3, 3))
    t = ALGO.init_tensors(info, AdapterOptions(algo="loha", dim=16, use_tucker=True))
    assert t["hada_w1_b"].std().item() == pytest.approx(1.0, rel=0.1)
    assert t["hada_w2_b"].std().item() == pytest.approx(1.0, rel=0.1)
    assert t["hada_w1_a"].std().item() == pytest.approx(0.1, rel=0.15)
    assert t["hada_t1"].std().item() == pytest.approx(0.1, rel=0.15)
    assert t["hada_t2"].std().item() == pytest.approx(0.1, rel=0.15)
    assert torch.count_nonzero(t["hada_w2_a"]) == 0
    t = ALGO.init_tensors(info, AdapterOptions(algo="loha", dim=16, use_scalar=True))
    assert t["hada_w2_a"].std().item() == pytest.approx(0.1, rel=0.15)
    assert t["hada_w1_b"].shape == (16, 48 * 9)
    assert float(t["alpha"]) == 1.0
    t = ALGO.init_tensors(info, AdapterOptions(algo="loha", dim=16, alpha=None))
    assert float(t["alpha"]) == 16.0


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("case", ["linear", "conv3x3_tucker"])
def test_use_scalar_folding(case: str) -> None:
    """The trained scalar is folded into hada_w1_a on save; the file then reproduces the forward."""
    assert ALGO.scalar_target == "hada_w1_a"
    layer, x, _, tucker = make_case(case)
    mod = lycoris_module(layer, dim=4, alpha=1.0, use_tucker=tucker, use_scalar=True)
    randomize(mod)
    with torch.no_grad():
        mod.scalar.fill_(0.7)
        ref = mod(x)
    t = saved_tensors(mod)
    assert torch.allclose(t["hada_w1_a"], mod.hada_w1_a.detach() * 0.7)
    for bypass in (False, True):
        assert delta_err(layer, x, ours(layer, x, t, 1.0, bypass), ref) < 1e-12


@pytest.mark.parametrize("case", ["linear", "conv3x3", "conv3x3_tucker"])
def test_rs_lora(case: str) -> None:
    layer, x, _, tucker = make_case(case)
    mod = lycoris_module(layer, dim=4, alpha=2.0, use_tucker=tucker, rs_lora=True)
    randomize(mod)
    t = saved_tensors(mod)
    assert float(t["alpha"]) == pytest.approx(4.0)  # α·r/√r
    assert ALGO.scale(t) == pytest.approx(2.0 / math.sqrt(4))
    with torch.no_grad():
        ref = mod(x)
    assert delta_err(layer, x, ours(layer, x, t, 1.0, False), ref) < 1e-12


@pytest.mark.parametrize("case", ["linear", "conv3x3", "conv3x3_tucker", "conv1d"])
@pytest.mark.parametrize("on_output", [True, False])
def test_dora_matches_lycoris(case: str, on_output: bool) -> None:
    """DoRA merge built with lyco_core.algorithms.dora equals LyCORIS's forward at μ=1 (fp32)."""
    layer, x, info, tucker = make_case(case, torch.float32)
    mod = lycoris_module(layer, dim=4, alpha=1.0, use_tucker=tucker, weight_decompose=True, wd_on_out=on_output)
    randomize(mod)
    t = saved_tensors(mod)
    m = t["dora_scale"]
    expect = (info.out_features, *[1] * (len(info.weight_shape) - 1)) if on_output else (1, info.in_features)
    assert tuple(m.shape[: len(expect)]) == expect
    assert dora.magnitude_on_output(m, info.weight_shape) == on_output
    assert ALGO.describe(t)["dora"] == ("output" if on_output else "input")
    with torch.no_grad():
        ref = mod(x)
    w, b = layer.weight.detach(), layer.bias.detach()
    dw = ALGO.delta_weight(t, info)
    got = info.forward(x, dora.dora_merge(w, dw, m, 1.0), b)
    assert delta_err(layer, x, got, ref) < 1e-5
    assert torch.equal(dora.dora_merge(w, dw, m, 0.0), w)


# ------------------------------------------------------------------------------------------ (c) bypass == rebuild
@pytest.mark.parametrize("case", list(CASES))
def test_bypass_equals_merge(case: str) -> None:
    layer, x, info, tucker = make_case(case)
    t = ALGO.init_tensors(info, AdapterOptions(algo="loha", dim=3, alpha=1.5, use_tucker=tucker))
    t = {k: (v if k == "alpha" else torch.randn_like(v)).to(F64) for k, v in t.items()}
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    base = info.forward(x, w, b)
    for mu in (0.0, 0.5, 1.0):
        merged = ALGO.merge(w, b, t, info, mu)
        via_merge = info.forward(x, *merged)
        via_bypass = ALGO.bypass(x, base, t, info, mu, base_weight=w, base_bias=b)
        if mu == 0.0:
            assert torch.equal(merged[0], w)
            assert torch.equal(via_bypass, base)
        else:
            assert rel_err(via_bypass - base, via_merge - base) < 1e-12


@torch.no_grad()
def test_bypass_dtype_follows_input() -> None:
    layer, x, info, _ = make_case("conv3x3", torch.bfloat16)
    t = ALGO.init_tensors(info, AdapterOptions(algo="loha", dim=4, use_scalar=True))
    base = layer(x)
    out = ALGO.bypass(x, base, t, info, 1.0)
    assert out.dtype == torch.bfloat16
    ref = info.forward(x.float(), *ALGO.merge(layer.weight.float(), layer.bias.float(), t, info))
    assert rel_err(out.float() - base.float(), ref - base.float()) < 0.05


# ------------------------------------------------------------------------------------------ gradients
def test_gradcheck_hada_product() -> None:
    f = [torch.randn(s, dtype=F64, requires_grad=True) for s in ((5, 3), (3, 7), (5, 3), (3, 7))]
    assert torch.autograd.gradcheck(lambda *a: HadaProduct.apply(*a, 0.37), f)
    # only some inputs need a gradient
    f[1].requires_grad_(False)
    f[2].requires_grad_(False)
    assert torch.autograd.gradcheck(lambda *a: HadaProduct.apply(*a, 1.3), f)


def test_gradcheck_hada_tucker_product() -> None:
    shapes = ((3, 2, 3, 2), (3, 5), (2, 4), (3, 2, 3, 2), (3, 5), (2, 4))
    f = [torch.randn(s, dtype=F64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *a: HadaTuckerProduct.apply(*a, 0.37), f)
    f[0].requires_grad_(False)
    f[5].requires_grad_(False)
    assert torch.autograd.gradcheck(lambda *a: HadaTuckerProduct.apply(*a, -0.8), f)


def test_functions_save_only_factors() -> None:
    """The custom functions keep only the factors for backward, never an (O, I·∏k) intermediate."""
    saved: list[torch.Tensor] = []

    def pack(v: torch.Tensor) -> torch.Tensor:
        saved.append(v)
        return v

    plain = [torch.randn(s, requires_grad=True) for s in ((64, 4), (4, 96), (64, 4), (4, 96))]
    tuck = [
        torch.randn(s, requires_grad=True) for s in ((4, 4, 3, 3), (4, 64), (4, 32), (4, 4, 3, 3), (4, 64), (4, 32))
    ]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        loha_delta(*plain, 0.5, (64, 32, 3))
        n_plain = sum(v.numel() for v in saved)
        saved.clear()
        loha_delta_tucker(*tuck, 0.5, (64, 32, 3, 3))
        n_tuck = sum(v.numel() for v in saved)
    assert n_plain == sum(v.numel() for v in plain)
    assert n_tuck == sum(v.numel() for v in tuck)


@pytest.mark.parametrize("case", ["linear", "conv3x3", "conv3x3_tucker"])
def test_training_gradients_match_lycoris(case: str) -> None:
    layer, x, info, tucker = make_case(case)
    mod = lycoris_module(layer, dim=4, alpha=1.0, use_tucker=tucker)
    randomize(mod)
    mod(x).pow(2).sum().backward()
    ref = {n: p.grad for n, p in mod.named_parameters() if n.startswith("hada_")}
    t = {n: p.detach().clone().requires_grad_(True) for n, p in mod.named_parameters() if n.startswith("hada_")}
    t["alpha"] = mod.alpha.detach()
    w, b = layer.weight.detach(), layer.bias.detach()
    info.forward(x, w + ALGO.delta_weight(t, info), b).pow(2).sum().backward()
    for n, g in ref.items():
        assert rel_err(t[n].grad, g) < 1e-10, n


# ------------------------------------------------------------------------------------------ (d) validate
def _sample(tucker: bool) -> tuple[dict[str, torch.Tensor], LayerInfo]:
    info = LayerInfo.conv(8, 6, (3, 3))
    return ALGO.init_tensors(info, AdapterOptions(algo="loha", dim=4, use_tucker=tucker)), info


@pytest.mark.parametrize(
    ("tucker", "edit", "error", "needle"),
    [
        (False, {"hada_w1_a": (9, 4), "hada_w2_a": (9, 4)}, IncompatibleBaseError, "(9, 54)"),
        (False, {"hada_w1_b": (4, 50), "hada_w2_b": (4, 50)}, IncompatibleBaseError, "weight"),
        (False, {"hada_w1_a": (9, 4)}, CorruptFileError, "halves"),
        (False, {"hada_w1_b": (3, 54)}, CorruptFileError, "hada_w1_b"),
        (False, {"hada_w2_b": (3, 54), "hada_w2_a": (8, 3)}, CorruptFileError, "rank"),
        (True, {"hada_t1": (4, 4, 5, 5), "hada_t2": (4, 4, 5, 5)}, IncompatibleBaseError, "(8, 6, 5, 5)"),
        (True, {"hada_w1_a": (8, 4)}, CorruptFileError, "hada_t1"),
        (True, {"hada_w1_b": (4, 7), "hada_w2_b": (4, 7)}, IncompatibleBaseError, "weight"),
    ],
)
def test_validate_errors(tucker: bool, edit: dict[str, tuple[int, ...]], error: type, needle: str) -> None:
    t, info = _sample(tucker)
    ALGO.validate(t, info, "lora_unet_x")
    t.update({k: torch.zeros(s) for k, s in edit.items()})
    with pytest.raises(error, match="lora_unet_x") as e:
        ALGO.validate(t, info, "lora_unet_x")
    assert needle in str(e.value)


def test_validate_missing_and_layer_kind() -> None:
    t, info = _sample(True)
    with pytest.raises(IncompatibleBaseError, match=r"lora_te_q.*Tucker"):
        ALGO.validate(t, LayerInfo.linear(8, 6), "lora_te_q")
    with pytest.raises(IncompatibleBaseError, match="lora_te_n"):
        ALGO.validate(t, LayerInfo("norm", 8, 8), "lora_te_n")
    del t["hada_t2"]
    with pytest.raises(CorruptFileError, match=r"lora_te_c.*hada_t2"):
        ALGO.validate(t, info, "lora_te_c")
    t, info = _sample(False)
    del t["hada_w2_b"]
    with pytest.raises(CorruptFileError, match=r"lora_te_c.*hada_w2_b"):
        ALGO.validate(t, info, "lora_te_c")


# ------------------------------------------------------------------------------------------ (e) file facts, registry
def test_describe_rank_scale_and_registry() -> None:
    t, info = _sample(False)
    assert ALGO.rank(t) == 4
    assert ALGO.scale(t) == pytest.approx(0.25)
    assert ALGO.describe(t) == {"algo": "loha", "rank": 4, "alpha": 1.0}
    t_tucker, _ = _sample(True)
    assert ALGO.describe(t_tucker) == {"algo": "loha", "rank": 4, "alpha": 1.0, "tucker": True}
    assert algorithms.get("loha").name == "loha"
    assert algorithms.detect(t).name == "loha"
    assert algorithms.detect(t_tucker).name == "loha"
    assert ALGO.supports_dora
    assert ALGO.default_bypass is True
    ALGO.check_options(AdapterOptions(algo="loha", dora=True, use_scalar=True), info)
    assert set(t) <= set(ALGO.tensor_names)


# ------------------------------------------------------------------------------------------ rank-r² bypass
def test_face_splitting_factors_are_exact() -> None:
    from lyco_core.algorithms.loha import loha_lowrank_factors

    w1a, w1b, w2a, w2b = (torch.randn(*s, dtype=torch.float64) for s in [(12, 3), (3, 20), (12, 2), (2, 20)])
    up, down = loha_lowrank_factors(w1a, w1b, w2a, w2b)
    assert up.shape == (12, 6)
    assert down.shape == (6, 20)
    torch.testing.assert_close(up @ down, (w1a @ w1b) * (w2a @ w2b))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_factorised_bypass_is_used_on_wide_layers_and_equals_rebuild(kind: str) -> None:
    from lyco_core.algorithms import loha as loha_mod

    base = nn.Linear(96, 80, bias=True) if kind == "linear" else nn.Conv2d(48, 64, 3, padding=1, stride=2)
    x = torch.randn(3, 96) if kind == "linear" else torch.randn(2, 48, 9, 9)
    base = base.double()
    x = x.double()
    layer = LayerInfo.from_module(base)
    t = {k: (torch.randn_like(v) if k != "alpha" else v).double()
         for k, v in ALGO.init_tensors(layer, AdapterOptions(algo="loha", dim=4, alpha=2.0)).items()}
    assert loha_mod._factorised_is_cheaper(t, layer)
    w, b = ALGO.merge(base.weight.detach(), base.bias.detach(), t, layer, 0.7)
    torch.testing.assert_close(ALGO.bypass(x, base(x), t, layer, 0.7), layer.forward(x, w, b))
