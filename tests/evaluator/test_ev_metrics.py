"""lyco_evaluator.metrics: the spec's test vectors (evaluation.md §4), properties, and independent references.

References: the `vendi-score` package (0.0.3) for Vendi, scipy.linalg.sqrtm / eigvals (dgm-eval's two FD
formulas) for the Fréchet distance, brute-force loops for the all-pairs forms.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from lyco_core.errors import InvalidConfigError
from lyco_evaluator import metrics as M

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from vendi_score import vendi as vendi_ref


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------------- §4.1 / §4.2 vectors
def test_image_similarity_and_scd_spec_vector() -> None:
    x = [[1, 0], [0, 1]]
    y = [[1, 0], [1, 0], [3, 4]]
    assert M.image_similarity(x, y) == pytest.approx(0.566667, abs=1e-6)
    assert M.squared_centroid_distance(x, y) == pytest.approx(0.188889, abs=1e-6)


def test_image_similarity_is_all_pairs_mean_and_scd_identity() -> None:
    rng = _rng(1)
    x, y = rng.normal(size=(7, 12)), rng.normal(size=(5, 12)) + 0.3
    pairs = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a in x for b in y]
    is_ = M.image_similarity(x, y)
    assert is_ == pytest.approx(np.mean(pairs), abs=1e-12)
    mx = (x / np.linalg.norm(x, axis=1, keepdims=True)).mean(0)
    my = (y / np.linalg.norm(y, axis=1, keepdims=True)).mean(0)
    # SCD = ‖μ̂_X‖² + ‖μ̂_Y‖² − 2·IS (spec §4.2)
    assert M.squared_centroid_distance(x, y) == pytest.approx(mx @ mx + my @ my - 2 * is_, abs=1e-12)
    # Same value from float16 torch tensors (cast up) as from float64 numpy, up to fp16 rounding.
    assert M.image_similarity(torch.tensor(x, dtype=torch.float16), torch.tensor(y)) == pytest.approx(is_, abs=2e-3)


def test_fidelity_properties() -> None:
    rng = _rng(2)
    v = rng.normal(size=(1, 9))
    rep = np.repeat(v, 4, axis=0) * rng.uniform(0.5, 3.0, size=(4, 1))
    assert M.image_similarity(rep, v) == pytest.approx(1.0, abs=1e-12)
    assert M.squared_centroid_distance(rep, v) == pytest.approx(0.0, abs=1e-12)
    x, y = rng.normal(size=(6, 9)), rng.normal(size=(8, 9))
    assert -1.0 <= M.image_similarity(x, y) <= 1.0
    assert M.image_similarity(x, -x) == pytest.approx(-M.image_similarity(x, x), abs=1e-12)
    assert M.squared_centroid_distance(x, y) >= 0.0
    # Row scaling and order do not matter.
    perm = rng.permutation(8)
    assert M.squared_centroid_distance(x * 5.0, y[perm] * 0.1) == pytest.approx(
        M.squared_centroid_distance(x, y), abs=1e-12
    )


# --------------------------------------------------------------------------------------------- §4.3 vector
def test_text_similarity_spec_vector_and_pairing() -> None:
    t, v = [[1, 0], [0, 2]], [[1, 1], [0, -1]]
    np.testing.assert_allclose(M.text_similarities(t, v), [0.70711, -1.0], atol=1e-5)
    assert M.text_similarity(t, v) == pytest.approx(-0.146447, abs=1e-6)
    # Paired, not all-pairs: torch's cosine_similarity (what the official code calls) is the reference.
    rng = _rng(3)
    a, b = rng.normal(size=(10, 16)), rng.normal(size=(10, 16))
    ref = torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b)).mean().item()
    assert M.text_similarity(a, b) == pytest.approx(ref, abs=1e-12)
    assert M.text_similarity(a, b) != pytest.approx(M.image_similarity(a, b), abs=1e-3)


# ------------------------------------------------------------------------------------------------ §4.4 Vendi
def test_vendi_spec_vectors() -> None:
    assert M.vendi_score([[1, 2, 3]] * 4) == pytest.approx(1.0, abs=1e-12)
    assert M.vendi_score(np.eye(4)) == pytest.approx(4.0, abs=1e-12)
    data = [[1, 0], [1, 0], [1, 0], [0, 1]]
    assert M.vendi_score(data) == pytest.approx(1.754765, abs=1e-6)
    np.testing.assert_allclose(M.per_prompt_vendi_scores(data, 2), [1.0, 2.0], atol=1e-12)
    assert M.per_prompt_vendi(data, 2) == pytest.approx(1.5, abs=1e-12)
    # §7's verified values of the package.
    assert M.vendi_score([[1, 0], [1, 0], [0, 1], [0, 1]]) == pytest.approx(2.0, abs=1e-12)
    assert M.vendi_score([[1, 0], [1, 1]]) == pytest.approx(1.516637, abs=1e-6)
    assert M.vendi_score([[1, 2, 3], [2, 4, 6], [0.5, 1, 1.5], [10, 20, 30]]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("n", "d"), [(40, 8), (8, 40), (30, 30), (300, 64)])
@pytest.mark.parametrize("q", [1, 2, 0.5, "inf"])
def test_vendi_matches_vendi_score_package(n: int, d: int, q: float | str) -> None:
    rng = _rng(n * 1000 + d)
    # Correlated, non-centred features: a spread-out spectrum, like encoder outputs.
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    ours = M.vendi_score(x, q=q)
    ref_dual = float(vendi_ref.score_dual(x, q=q))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref_k = float(vendi_ref.score_K(xn @ xn.T, q=q))  # the primal N×N kernel
    assert _rel(ours, ref_dual) < 1e-6
    assert _rel(ours, ref_k) < 1e-6
    if q == 1:
        assert _rel(ours, float(vendi_ref.score_X(x))) < 1e-6
    assert M.vendi_score(torch.tensor(x, dtype=torch.float32), q=q) == pytest.approx(ours, rel=1e-5)
    assert M.vendi_score(x, q=math.inf if q == "inf" else q) == ours


def test_vendi_properties() -> None:
    rng = _rng(5)
    for n, d in [(20, 5), (5, 20), (50, 50)]:
        x = rng.normal(size=(n, d))
        vs = M.vendi_score(x)
        assert 1.0 - 1e-9 <= vs <= n + 1e-9
        # Row order, row scale and row sign (K → SKS, S = diag(±1), a similarity transform) do not matter.
        scale = rng.uniform(0.01, 100.0, size=(n, 1)) * rng.choice([-1.0, 1.0], size=(n, 1))
        assert M.vendi_score(x[rng.permutation(n)] * scale) == pytest.approx(vs, rel=1e-9)
        # Rényi scores are non-increasing in q, and 1/λ_max is the smallest.
        scores = [M.vendi_score(x, q=q) for q in (0.5, 1, 2, 5, "inf")]
        assert all(a >= b - 1e-9 for a, b in itertools.pairwise(scores))
    q_orth = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    assert M.vendi_score(q_orth[:7] * 3.0) == pytest.approx(7.0, abs=1e-9)
    assert M.vendi_score(np.repeat(rng.normal(size=(1, 300)), 500, axis=0)) == pytest.approx(1.0, abs=1e-9)
    # q = 0 counts the non-zero eigenvalues: the rank, in both the N > D and N ≤ D branches.
    low_rank = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 10))
    assert M.vendi_score(low_rank, q=0) == pytest.approx(3.0, abs=1e-9)
    wide_low_rank = rng.normal(size=(8, 3)) @ rng.normal(size=(3, 40))
    assert M.vendi_score(wide_low_rank, q=0) == pytest.approx(3.0, abs=1e-9)


def test_per_prompt_vendi_blocks_like_official_code() -> None:
    rng = _rng(6)
    x = rng.normal(size=(25, 6))
    scores = M.per_prompt_vendi_scores(x, 10)  # blocks 0:10, 10:20, 20:25
    expected = [float(vendi_ref.score_dual(x[s : s + 10])) for s in (0, 10, 20)]
    np.testing.assert_allclose(scores, expected, rtol=1e-9)
    assert M.per_prompt_vendi(x, 10) == pytest.approx(np.mean(expected), rel=1e-9)


# --------------------------------------------------------------------------------------------- §4.5 style
def test_gram_spec_vector() -> None:
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)
    (g,) = M.gram_matrices([f])
    torch.testing.assert_close(g, torch.tensor([[[1.25, 2.75], [2.75, 6.25]]]))


def test_gram_shapes_match_vgg19_layout_and_brute_force() -> None:
    torch.manual_seed(0)
    maps = [torch.randn(2, c, s, s + 1) for c, s in zip((64, 128, 256, 512, 512), (8, 6, 4, 3, 2))]
    grams = M.gram_matrices(maps)
    assert [tuple(g.shape) for g in grams] == [(2, c, c) for c in (64, 128, 256, 512, 512)]
    assert M.flatten_grams(grams).shape == (2, 610_304)
    f = maps[1][1].double().reshape(128, -1)
    brute = f @ f.T / f.numel()
    torch.testing.assert_close(grams[1][1].double(), brute, rtol=1e-5, atol=1e-6)
    # fp16 maps are cast up: same Grams as from the float32 copy.
    g16 = M.gram_matrices([maps[0].half()])[0]
    torch.testing.assert_close(g16, M.gram_matrices([maps[0].half().float()])[0])


def test_style_loss_paired_and_vs_dataset() -> None:
    torch.manual_seed(1)
    a = M.gram_matrices([torch.randn(3, 4, 5, 5), torch.randn(3, 6, 3, 3)])
    b = M.gram_matrices([torch.randn(3, 4, 5, 5), torch.randn(3, 6, 3, 3)])
    losses = M.style_loss(a, b)
    brute = [sum(float(((ga[k].double() - gb[k].double()) ** 2).sum()) for ga, gb in zip(a, b)) for k in range(3)]
    np.testing.assert_allclose(losses.numpy(), brute, rtol=1e-10)
    torch.testing.assert_close(M.style_loss(M.flatten_grams(a), M.flatten_grams(b)), losses)
    torch.testing.assert_close(M.style_loss(a, a), torch.zeros(3, dtype=torch.float64))
    # vs dataset: the closed form equals the brute-force mean over all cross pairs.
    ref = M.gram_matrices([torch.randn(5, 4, 5, 5), torch.randn(5, 6, 3, 3)])
    fa, fr = M.flatten_grams(a).double(), M.flatten_grams(ref).double()
    pairs = [float(((fa[i] - fr[j]) ** 2).sum()) for i in range(3) for j in range(5)]
    assert M.style_loss_vs_dataset(a, ref) == pytest.approx(np.mean(pairs), rel=1e-10)


# ---------------------------------------------------------------------------------------------- §4.6 FD
def _fd_sqrtm(x: np.ndarray, y: np.ndarray) -> float:
    """dgm-eval's compute_FD_with_stats: scipy.linalg.sqrtm of Σ₁Σ₂."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _fd_eigvals(x: np.ndarray, y: np.ndarray) -> float:
    """dgm-eval's compute_efficient_FD_with_reps (the one eval_fd.py calls)."""
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    sqrt_trace = np.real(scipy.linalg.eigvals(s1 @ s2) ** 0.5).sum()
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + s1.trace() + s2.trace() - 2 * sqrt_trace)


@pytest.mark.parametrize(("m", "n", "d"), [(200, 150, 8), (30, 20, 16), (12, 9, 40), (300, 5, 12)])
def test_frechet_distance_matches_dgm_eval(m: int, n: int, d: int) -> None:
    # (200,150,8), (300,5,12): the D×D eigendecomposition branch; (30,20,16), (12,9,40): the nuclear-norm one.
    rng = _rng(m + n + d)
    x = rng.normal(size=(m, d)) @ rng.normal(size=(d, d))
    y = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.7 + 0.5
    ours = M.frechet_distance(x, y)
    assert ours == pytest.approx(_fd_eigvals(x, y), rel=1e-7)
    if m > d and n > d:  # sqrtm of a singular product is unreliable (dgm-eval adds eps there)
        assert ours == pytest.approx(_fd_sqrtm(x, y), rel=1e-7)


def test_frechet_distance_properties() -> None:
    rng = _rng(8)
    x = rng.normal(size=(50, 6))
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert M.frechet_distance(x, x[rng.permutation(50)]) == pytest.approx(0.0, abs=1e-9)
    # A shift adds exactly ‖shift‖² (covariances unchanged).
    shift = np.arange(6.0)
    assert M.frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # Two Gaussians with known stats: N(0, I) vs N(0, 4I) → D·(1 + 4 − 2·2) = D, up to sampling noise.
    big = rng.normal(size=(20000, 3))
    assert M.frechet_distance(big, 2 * rng.normal(size=(20000, 3))) == pytest.approx(3.0, rel=0.05)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: M.image_similarity([[0.0, 0.0], [1.0, 0.0]], [[1.0, 0.0]]), r"'ref' has a zero vector at row 0"),
        (lambda: M.squared_centroid_distance([[1.0, 0.0]], [[1.0, 2.0], [0.0, 0.0]]), r"'gen' has a zero vector"),
        (lambda: M.text_similarity([[1.0, 0.0]], [[0.0, 0.0]]), r"'img' has a zero vector"),
        (lambda: M.vendi_score([[0.0, 0.0], [1.0, 0.0]]), r"'features' has a zero vector"),
        (lambda: M.image_similarity(np.zeros((0, 3)), [[1.0, 0.0, 0.0]]), r"'ref' is an empty set"),
        (lambda: M.vendi_score(torch.zeros(0, 5)), r"'features' is an empty set"),
        (lambda: M.image_similarity([[1.0, 0.0]], [[1.0, 0.0, 0.0]]), r"widths differ.*D=2.*D=3"),
        (lambda: M.frechet_distance(np.ones((3, 2)), np.ones((3, 4))), r"widths differ"),
        (lambda: M.text_similarity([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]), r"paired.*1 rows.*2"),
        (lambda: M.vendi_score([[1.0, float("nan")]]), r"NaN or infinite"),
        (lambda: M.text_similarity(torch.tensor([[1.0, math.inf]]), [[1.0, 0.0]]), r"'text' holds NaN"),
        (lambda: M.vendi_score(np.array([1.0, 2.0])), r"must be 2-D"),
        (lambda: M.vendi_score([[1.0, 0.0]], q=-1), r"q=-1"),
        (lambda: M.vendi_score([[1.0, 0.0]], q="two"), r"q='two'"),
        (lambda: M.per_prompt_vendi([[1.0, 0.0]], 0), r"images_per_prompt=0"),
        (lambda: M.frechet_distance([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]), r"'ref' needs at least 2 rows"),
        (lambda: M.gram_matrices([]), r"no feature maps"),
        (lambda: M.gram_matrices([torch.ones(2, 3, 4)]), r"feature_maps\[0\] must be a tensor \(B, C, H, W\)"),
        (lambda: M.gram_matrices([torch.ones(2, 3, 2, 2), torch.ones(3, 3, 2, 2)]), r"batch 3"),
        (lambda: M.gram_matrices([torch.full((1, 2, 2, 2), math.nan)]), r"NaN"),
        (lambda: M.style_loss([torch.ones(2, 3, 3)], [torch.ones(3, 3, 3)]), r"paired"),
        (lambda: M.style_loss_vs_dataset([torch.ones(2, 3, 3)], [torch.ones(2, 4, 4)]), r"K=9.*K=16"),
        (lambda: M.style_loss([], [torch.ones(1, 2, 2)]), r"'grams_a' holds no Gram"),
    ],
)
def test_bad_input_raises_one_line_error(call: object, match: str) -> None:
    with pytest.raises(InvalidConfigError, match=match) as info:
        call()  # type: ignore[operator]
    assert "\n" not in str(info.value)
