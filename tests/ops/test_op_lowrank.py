"""lyco_core.ops.lowrank: rank rules, SVD to LoRA/LoCon/Tucker factors, reported errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checks import rel_err

from lyco_core.errors import InvalidConfigError
from lyco_core.files import group_modules
from lyco_core.ops.lowrank import choose_method, lowrank_svd, select_rank, to_lora


def decaying(m: int, n: int, power: float = 0.7, seed: int = 0) -> torch.Tensor:
    """An (m, n) matrix with singular values σᵢ = (1 + i)^-power (a trained-like spectrum)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = (1.0 + torch.arange(k, dtype=torch.float32)) ** -power
    return (u * s) @ v.T


def reload_delta(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW as lyco_core's file reader computes it from kohya tensors."""
    mods, unknown = group_modules({f"lora_unet_x.{k}": v for k, v in tensors.items()})
    assert not unknown
    assert mods["lora_unet_x"].algorithm.name == "lora"
    return mods["lora_unet_x"].delta_weight(torch.zeros(shape))


# --------------------------------------------------------------------------------------------- rank rules
S = torch.tensor([10.0, 5.0, 2.5, 1.5, 0.6, 0.4])  # Σσ = 20, Σσ² = 133.12


@pytest.mark.parametrize(
    ("mode", "param", "expected"),
    [
        ("fixed", 3, 3),
        ("fixed", 50, 6),  # clamped to len(s)
        ("threshold", 1.5, 3),  # strictly greater
        ("threshold", 1.49, 4),
        ("threshold", 100.0, 1),  # never below 1
        ("ratio", 0.2, 3),  # σ > 2
        ("ratio", 0.0, 6),
        ("quantile", 0.75, 2),  # cumsum/Σ = .5 .75 .875 .95 .98 1
        ("quantile", 0.76, 3),
        ("sv_cumulative", 0.95, 4),
        ("sv_cumulative", 1.0, 6),
        ("sv_ratio", 4.0, 3),  # σ ≥ 2.5
        ("sv_ratio", 1.0, 1),
        ("sv_fro", 0.9, 2),  # √(cumsum σ²/Σσ²) = .867 .969 …
        ("sv_fro", 0.97, 3),
    ],
)
def test_select_rank_rules(mode: str, param: float, expected: int) -> None:
    assert select_rank(S, mode, param) == expected


def test_select_rank_caps_and_zero_spectrum() -> None:
    assert select_rank(S, "ratio", 0.0, max_rank=2) == 2
    assert select_rank(S, "sv_fro", 1.0, max_rank=4) == 4
    assert select_rank(torch.zeros(5), "sv_ratio", 2.0) == 1
    assert select_rank(torch.zeros(5), "threshold", 0.0) == 1


def test_select_rank_matches_lycoris_extract() -> None:
    """threshold/ratio are LyCORIS' rules exactly; its quantile keeps one component fewer than ours."""
    from lycoris.utils import extract_linear

    w = decaying(48, 40, power=1.0, seed=3)  # σᵢ = 1/(1 + i)
    s = torch.linalg.svdvals(w)
    for mode, p in (("threshold", 0.0525), ("ratio", 0.105), ("quantile", 0.6)):
        (down, _up, _diff), kind = extract_linear(w, mode, p)
        assert kind == "low rank"
        ours = select_rank(s, mode, p)
        assert ours == down.shape[0] + (1 if mode == "quantile" else 0), mode


@pytest.mark.parametrize(
    ("mode", "param", "words"),
    [("nope", 1, "nope"), ("fixed", 0, "rank"), ("fixed", 2.5, "rank"), ("ratio", 1.5, "ratio"),
     ("sv_ratio", 0.5, "sv_ratio"), ("sv_fro", 0.0, "sv_fro"), ("quantile", None, "quantile"),
     ("threshold", -1.0, "threshold")],
)
def test_select_rank_bad_input(mode: str, param: float | None, words: str) -> None:
    with pytest.raises(InvalidConfigError, match=words):
        select_rank(S, mode, param)


# --------------------------------------------------------------------------------------------- to_lora
def test_linear_full_svd_equals_numpy_truncation() -> None:
    a = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    lr = to_lora(a, rank=5, method="full")
    u, s, vh = np.linalg.svd(a.double().numpy(), full_matrices=False)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert lr.up.shape == (40, 5)
    assert lr.down.shape == (5, 30)
    assert lr.mid is None
    assert rel_err(lr.delta().double(), torch.from_numpy(best)) < 1e-5
    expected = np.linalg.norm(a.double().numpy() - best) / np.linalg.norm(a.double().numpy())
    assert lr.rel_error == pytest.approx(expected, rel=1e-5)
    t = lr.tensors()
    assert set(t) == {"lora_up.weight", "lora_down.weight", "alpha"}
    assert float(t["alpha"]) == 5.0
    assert rel_err(reload_delta(t, (40, 30)), lr.delta()) < 1e-6


def test_lycoris_extract_gives_same_delta() -> None:
    from lycoris.utils import extract_conv

    w = decaying(24, 16 * 9, seed=4).reshape(24, 16, 3, 3)
    (down, up, _diff), _ = extract_conv(w, "fixed", 6)
    theirs = (up.reshape(24, 6) @ down.reshape(6, -1)).reshape(w.shape)
    assert rel_err(to_lora(w, rank=6, method="full").delta(), theirs) < 1e-5


@pytest.mark.parametrize(("m", "n", "r"), [(400, 600, 8), (400, 600, 32), (900, 300, 16)])
def test_randomized_within_one_percent_of_optimal(m: int, n: int, r: int) -> None:
    a = decaying(m, n, seed=m + r)
    s = torch.linalg.svdvals(a.double())
    optimal = float(s[r:].norm() / s.norm())
    lr = to_lora(a, rank=r, method="randomized")
    assert lr.method == "randomized"
    assert lr.rank == r
    measured = rel_err(lr.delta().double(), a.double())
    assert lr.rel_error == pytest.approx(measured, rel=1e-4)
    assert optimal <= measured * (1 + 1e-5)
    assert measured <= 1.01 * optimal


def test_randomized_is_deterministic() -> None:
    a = decaying(300, 200, seed=9)
    u1, s1, v1 = lowrank_svd(a, 10, "randomized")
    u2, s2, v2 = lowrank_svd(a, 10, "randomized")
    assert torch.equal(s1, s2)
    assert torch.equal(u1, u2)
    assert torch.equal(v1, v2)


def test_auto_method_choice() -> None:
    assert choose_method((1280, 1280), 32, "fixed", "auto") == "randomized"
    assert choose_method((320, 2880), 32, "fixed", "auto") == "randomized"
    assert choose_method((128, 128), 16, "fixed", "auto") == "full"  # too small to win
    assert choose_method((256, 256), 64, "fixed", "auto") == "full"  # sketch too wide
    assert choose_method((1280, 1280), None, "sv_fro", "auto") == "full"  # needs the spectrum
    assert choose_method((1280, 1280), 32, "fixed", "full") == "full"
    with pytest.raises(InvalidConfigError, match="svd"):
        choose_method((10, 10), 2, "fixed", "svd")
    lr = to_lora(decaying(640, 640), rank=8)
    assert lr.method == "randomized"


def test_dynamic_mode_with_cap_and_exact_low_rank() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(50, 3, generator=g) @ torch.randn(3, 60, generator=g)  # exactly rank 3
    lr = to_lora(a, mode="ratio", param=1e-4)
    assert lr.rank == 3
    assert lr.rel_error < 1e-6
    assert rel_err(lr.delta(), a) < 1e-5
    assert to_lora(a, mode="ratio", param=1e-4, rank=2).rank == 2
    assert to_lora(a, mode="sv_fro", param=1.0, max_rank=1).rank == 1


def test_zero_delta() -> None:
    lr = to_lora(torch.zeros(8, 6, 3, 3), rank=2)
    assert lr.rel_error == 0.0
    assert float(lr.delta().abs().max()) == 0.0


@pytest.mark.parametrize("shape", [(12, 8, 3, 3), (12, 8, 1, 1), (10, 6, 5), (6, 4, 3, 3, 3)])
def test_conv_reloads_with_same_delta(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    lr = to_lora(w, rank=3)
    ones = (1,) * (len(shape) - 2)
    assert lr.up.shape == (shape[0], 3, *ones)
    assert lr.down.shape == (3, *shape[1:])
    back = reload_delta(lr.tensors(), shape)
    assert rel_err(back, lr.delta()) < 1e-6
    assert rel_err(back, w) == pytest.approx(lr.rel_error, rel=1e-4)
    flat = torch.linalg.svdvals(w.reshape(shape[0], -1).double())
    assert lr.rel_error == pytest.approx(float(flat[3:].norm() / flat.norm()), rel=1e-5)


@pytest.mark.parametrize("shape", [(12, 8, 3, 3), (10, 6, 5), (6, 5, 3, 3, 3)])
def test_tucker_conv(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(6)
    o, i, kernel, r = shape[0], shape[1], shape[2:], 3
    up, down = torch.randn(o, r, generator=g), torch.randn(r, i, generator=g)
    core = torch.randn(r, r, *kernel, generator=g)
    exact = torch.einsum("oa,ab...,bc->oc...", up, core, down)  # a Tucker-rank-3 conv ΔW
    lr = to_lora(exact, rank=r, tucker=True)
    ones = (1,) * len(kernel)
    assert lr.up.shape == (o, r, *ones)
    assert lr.down.shape == (r, i, *ones)
    assert lr.mid is not None
    assert lr.mid.shape == (r, r, *kernel)
    assert lr.rel_error < 1e-5
    noisy = exact + 0.3 * torch.randn(shape, generator=g)
    lr = to_lora(noisy, rank=2, tucker=True)
    back = reload_delta(lr.tensors(), shape)
    assert rel_err(back, lr.delta()) < 1e-6
    assert rel_err(back, noisy) == pytest.approx(lr.rel_error, rel=1e-4)
    # Tucker has fewer parameters than a LoCon of the same rank, so it cannot beat its optimum
    assert lr.rel_error >= to_lora(noisy, rank=2, method="full").rel_error - 1e-6


def test_tucker_loads_in_lycoris_with_same_delta() -> None:
    """The Tucker layout is LyCORIS' own: its LoConModule (use_tucker) rebuilds the same ΔW."""
    from lycoris.modules.locon import LoConModule

    w = torch.randn(12, 8, 3, 3, generator=torch.Generator().manual_seed(7))
    lr = to_lora(w, rank=3, tucker=True)
    mod = LoConModule("x", torch.nn.Conv2d(8, 12, 3, padding=1), lora_dim=3, alpha=3, use_tucker=True)
    result = mod.load_state_dict(lr.tensors(), strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith("lora_")]
    theirs = mod.get_diff_weight()[0]
    assert rel_err(theirs.reshape(w.shape), lr.delta()) < 1e-5


def test_tucker_on_pointwise_is_plain() -> None:
    lr = to_lora(torch.randn(8, 6, 1, 1), rank=2, tucker=True)
    assert lr.mid is None
    assert lr.down.shape == (2, 6, 1, 1)


def test_bad_delta_shape() -> None:
    with pytest.raises(InvalidConfigError, match="shape"):
        to_lora(torch.zeros(5), rank=1)
