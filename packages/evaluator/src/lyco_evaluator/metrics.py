"""The LyCORIS paper's metrics as pure functions (spec: ``shared/specs/evaluation.md`` §4).

Every function takes feature arrays — numpy arrays, torch tensors (any device/dtype) or nested lists — of
shape ``(N, D)``: one row per image or prompt, ``D`` the encoder's feature width. Work is done in float64 on
the CPU (the official code works in float32/fp16; the difference is round-off), and results are Python
floats. Trigger-word handling, preprocessing and which images form a set are the caller's business.

Definitions follow the official evaluation code (``cyber-meow/LyCORIS-evaluation``):

* :func:`image_similarity` — mean cosine over **all** reference × generated pairs (§4.1).
* :func:`squared_centroid_distance` — ``‖mean(x̂) − mean(ŷ)‖²`` on L2-normalised rows (§4.2).
* :func:`text_similarity` — mean cosine of **paired** rows (text k ↔ image k) (§4.3).
* :func:`vendi_score` — ``exp(H_q(eig(K/N)))`` with the cosine kernel; :func:`per_prompt_vendi` (§4.4).
* :func:`gram_matrices`, :func:`style_loss`, :func:`style_loss_vs_dataset` — VGG19 Grams (§4.5).
* :func:`frechet_distance` — dgm-eval's FD on raw features, unbiased covariances (§4.6).

Bad input (empty sets, zero vectors where a cosine is taken, NaN/inf, mismatched widths or row counts)
raises :class:`lyco_core.errors.InvalidConfigError` with a one-line message naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch

from lyco_core.errors import InvalidConfigError

__all__ = [
    "FeatureArray",
    "flatten_grams",
    "frechet_distance",
    "gram_matrices",
    "image_similarity",
    "normalize_rows",
    "per_prompt_vendi",
    "per_prompt_vendi_scores",
    "squared_centroid_distance",
    "style_loss",
    "style_loss_vs_dataset",
    "text_similarities",
    "text_similarity",
    "vendi_score",
]

FeatureArray: TypeAlias = np.ndarray | torch.Tensor | Sequence[Sequence[float]]
"""Features ``(N, D)``: a numpy array, a torch tensor or nested lists of numbers."""

VendiOrder: TypeAlias = float | int | str
"""Order ``q`` of the Vendi score: a number ≥ 0, or ``"inf"`` / ``math.inf``."""


# ---------------------------------------------------------------------------------------------- validation
def _features(x: FeatureArray, name: str, fn: str) -> np.ndarray:
    """``x`` as a float64 numpy array ``(N, D)`` with N, D ≥ 1 and only finite values."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise InvalidConfigError(f"{fn}: '{name}' is not a numeric array ({e})") from None
    if arr.ndim != 2:
        raise InvalidConfigError(f"{fn}: '{name}' must be 2-D (N, D), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise InvalidConfigError(f"{fn}: '{name}' is an empty set (0 rows)")
    if arr.shape[1] == 0:
        raise InvalidConfigError(f"{fn}: '{name}' has zero-width features (shape {tuple(arr.shape)})")
    if not np.isfinite(arr).all():
        row = int(np.argwhere(~np.isfinite(arr))[0, 0])
        raise InvalidConfigError(f"{fn}: '{name}' holds NaN or infinite values (first at row {row})")
    return arr


def _same_width(a: np.ndarray, b: np.ndarray, names: tuple[str, str], fn: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise InvalidConfigError(
            f"{fn}: feature widths differ: '{names[0]}' has D={a.shape[1]}, '{names[1]}' has D={b.shape[1]}"
        )


def _unit_rows(x: np.ndarray, name: str, fn: str) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norms; a zero row has no direction, so it is an error."""
    norms = np.linalg.norm(x, axis=1)
    zero = np.flatnonzero(norms == 0.0)
    if zero.size:
        raise InvalidConfigError(
            f"{fn}: '{name}' has a zero vector at row {int(zero[0])} (its cosine similarity is undefined)"
        )
    return x / norms[:, None]


def normalize_rows(features: FeatureArray) -> np.ndarray:
    """L2-normalised rows ``(N, D)`` float64 of ``features`` (zero rows are an error)."""
    return _unit_rows(_features(features, "features", "normalize_rows"), "features", "normalize_rows")


# ---------------------------------------------------------------------------------- fidelity: IS and SCD
def _unit_centroids(ref: FeatureArray, gen: FeatureArray, fn: str) -> tuple[np.ndarray, np.ndarray]:
    x = _features(ref, "ref", fn)
    y = _features(gen, "gen", fn)
    _same_width(x, y, ("ref", "gen"), fn)
    return _unit_rows(x, "ref", fn).mean(axis=0), _unit_rows(y, "gen", fn).mean(axis=0)


def image_similarity(ref: FeatureArray, gen: FeatureArray) -> float:
    """Image Similarity: mean cosine over all ``m·n`` pairs of reference and generated rows (§4.1).

    Args:
        ref: reference (dataset) features ``(m, D)``.
        gen: generated-image features ``(n, D)``.

    Returns:
        ``(1/(m·n)) Σ_i Σ_j ⟨x̂_i, ŷ_j⟩ = ⟨μ̂_X, μ̂_Y⟩`` in ``[-1, 1]``; higher is better.
    """
    mx, my = _unit_centroids(ref, gen, "image_similarity")
    return float(mx @ my)


def squared_centroid_distance(ref: FeatureArray, gen: FeatureArray) -> float:
    """Squared Centroid Distance ``‖μ̂_X − μ̂_Y‖²`` of the L2-normalised rows (§4.2); lower is better.

    Args:
        ref: reference features ``(m, D)``.
        gen: generated features ``(n, D)``.

    Returns:
        A value in ``[0, 4]``.
    """
    mx, my = _unit_centroids(ref, gen, "squared_centroid_distance")
    d = mx - my
    return float(d @ d)


# -------------------------------------------------------------------------- controllability: text–image
def text_similarities(text: FeatureArray, img: FeatureArray) -> np.ndarray:
    """Per-pair cosines ``cos(t_k, v_k)`` ``(N,)`` of text row k and image row k (§4.3)."""
    fn = "text_similarity"
    t = _features(text, "text", fn)
    v = _features(img, "img", fn)
    _same_width(t, v, ("text", "img"), fn)
    if t.shape[0] != v.shape[0]:
        raise InvalidConfigError(f"{fn}: rows are paired, but 'text' has {t.shape[0]} rows and 'img' has {v.shape[0]}")
    result: np.ndarray = np.einsum("kd,kd->k", _unit_rows(t, "text", fn), _unit_rows(v, "img", fn))
    return result


def text_similarity(text: FeatureArray, img: FeatureArray) -> float:
    """Text Similarity: mean over k of ``cos(t_k, v_k)``, text row k paired with image row k (§4.3).

    Args:
        text: CLIP text features ``(N, D)`` of the (trigger-mapped) prompts, one row per image.
        img: CLIP image features ``(N, D)`` in the same order.

    Returns:
        The paired mean cosine in ``[-1, 1]``; higher is better.
    """
    return float(text_similarities(text, img).mean())


# ---------------------------------------------------------------------------------------- diversity: Vendi
def _order(q: VendiOrder) -> float:
    if isinstance(q, str):
        if q.strip().lower() != "inf":
            raise InvalidConfigError(f"vendi_score: order q={q!r} is not a number or 'inf'")
        return math.inf
    if isinstance(q, bool) or not isinstance(q, (int, float)) or math.isnan(q) or q < 0:
        raise InvalidConfigError(f"vendi_score: order q={q!r} must be a number >= 0 or 'inf'")
    return float(q)


def _entropy(eigenvalues: np.ndarray, q: float, size: int) -> float:
    """Order-q entropy of the spectrum (vendi-score's ``entropy_q``), numerically-zero eigenvalues dropped.

    The official code keeps every eigenvalue > 0. Exact zeros come out of ``eigvalsh`` as ±1e-17-sized
    round-off, so "> 0" would keep a random half of them (and a different half in the N×N and D×D forms).
    Dropping those below τ = ``size·eps·λ_max`` (below ``eigvalsh``'s own error) changes the q = 1 entropy by
    at most ``rank·τ·|log τ|`` (< 1e-7 for size 10,000; round-off in practice) and makes orders q < 1, which
    count small eigenvalues, well defined.
    """
    lam_max = float(eigenvalues.max())
    p = eigenvalues[eigenvalues > lam_max * size * np.finfo(np.float64).eps]
    if q == 1.0:
        return float(-(p * np.log(p)).sum())
    if math.isinf(q):
        return -math.log(lam_max)
    return float(np.log((p**q).sum()) / (1.0 - q))


def _vendi_unit(x: np.ndarray, q: float) -> float:
    """Vendi score of rows that are already unit-norm float64 ``(n, D)``."""
    n, d = x.shape
    # K/n = X Xᵀ/n (n×n) and Xᵀ X/n (D×D) have the same non-zero eigenvalues; take the smaller matrix
    # (numpy computes a product of an array with its own transpose with BLAS syrk: half the flops of gemm).
    k = (x.T @ x) / n if n > d else (x @ x.T) / n
    return math.exp(_entropy(np.linalg.eigvalsh(k), q, max(n, d)))


def vendi_score(features: FeatureArray, q: VendiOrder = 1) -> float:
    """Vendi score with the cosine kernel: ``exp(H_q(λ))``, λ the eigenvalues of ``K/N``, ``K = ŶŶᵀ`` (§4.4).

    ``q = 1`` is the paper's (von Neumann entropy ``−Σ λ log λ``); ``q = "inf"`` gives ``1/λ_max``; other
    ``q`` the Rényi form ``(Σ λ^q)^(1/(1−q))``. For ``N > D`` the ``D×D`` matrix ``ŶᵀŶ/N`` is decomposed
    instead of the ``N×N`` kernel (same non-zero spectrum), in float64.

    Args:
        features: ``(N, D)`` features of one image set (rows need not be normalised; zero rows are an error).
        q: the order, a number ≥ 0 or ``"inf"``.

    Returns:
        The effective number of distinct samples, in ``[1, N]``; higher is more diverse.
    """
    order = _order(q)
    x = _features(features, "features", "vendi_score")
    return _vendi_unit(_unit_rows(x, "features", "vendi_score"), order)


def per_prompt_vendi_scores(features: FeatureArray, images_per_prompt: int, q: VendiOrder = 1) -> np.ndarray:
    """Vendi scores ``(ceil(N / images_per_prompt),)`` of consecutive blocks of rows (one block per prompt).

    As the official code, the last block holds the remainder when ``images_per_prompt`` does not divide N.
    """
    fn = "per_prompt_vendi"
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise InvalidConfigError(f"{fn}: images_per_prompt={images_per_prompt!r} must be an integer >= 1")
    order = _order(q)
    x = _unit_rows(_features(features, "features", fn), "features", fn)
    blocks = range(0, x.shape[0], images_per_prompt)
    return np.array([_vendi_unit(x[s : s + images_per_prompt], order) for s in blocks], dtype=np.float64)


def per_prompt_vendi(features: FeatureArray, images_per_prompt: int, q: VendiOrder = 1) -> float:
    """Mean of :func:`per_prompt_vendi_scores`: the paper's Vendi for ``alter`` (blocks of 10 images)."""
    return float(per_prompt_vendi_scores(features, images_per_prompt, q).mean())


# ---------------------------------------------------------------------------------- preservation: style
def gram_matrices(feature_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gram matrices ``G = F Fᵀ / (C·H·W)`` of VGG feature maps (§4.5).

    Args:
        feature_maps: per layer a tensor ``(B, C, H, W)`` (VGG19 conv1_1…conv5_1, before ReLU); the batch
            size B must agree across layers.

    Returns:
        Per layer a float32 tensor ``(B, C, C)`` on the maps' device. Like the official code, F is scaled by
        ``1/√(C·H·W)`` before the product (no fp16 overflow on large maps).
    """
    fn = "gram_matrices"
    if len(feature_maps) == 0:
        raise InvalidConfigError(f"{fn}: no feature maps given")
    grams: list[torch.Tensor] = []
    batch: int | None = None
    for i, f in enumerate(feature_maps):
        if not isinstance(f, torch.Tensor) or f.ndim != 4:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise InvalidConfigError(f"{fn}: feature_maps[{i}] must be a tensor (B, C, H, W), got {shape}")
        b, c, h, w = f.shape
        if min(b, c, h, w) == 0:
            raise InvalidConfigError(f"{fn}: feature_maps[{i}] is empty (shape {tuple(f.shape)})")
        if batch is not None and b != batch:
            raise InvalidConfigError(f"{fn}: feature_maps[{i}] has batch {b}, feature_maps[0] has {batch}")
        batch = b
        if not torch.isfinite(f).all():
            raise InvalidConfigError(f"{fn}: feature_maps[{i}] holds NaN or infinite values")
        flat = f.detach().to(torch.float32).reshape(b, c, h * w) / math.sqrt(c * h * w)
        grams.append(torch.bmm(flat, flat.transpose(1, 2)))
    return grams


def flatten_grams(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-layer Grams ``(B, C_l, C_l)`` into ``(B, Σ C_l²)`` (610,304 for VGG19's 5 layers)."""
    if len(grams) == 0:
        raise InvalidConfigError("flatten_grams: no Gram matrices given")
    return torch.cat([g.reshape(g.shape[0], -1) for g in grams], dim=1)


def _gram_rows(grams: Sequence[torch.Tensor] | torch.Tensor, name: str, fn: str) -> torch.Tensor:
    """Grams as one float64 CPU matrix ``(B, K)``: a list of per-layer ``(B, C, C)`` or an already flat one."""
    if isinstance(grams, torch.Tensor):
        if grams.ndim != 2:
            raise InvalidConfigError(
                f"{fn}: '{name}' must be a list of (B, C, C) or one (B, K), got {tuple(grams.shape)}"
            )
        flat = grams
    else:
        if len(grams) == 0:
            raise InvalidConfigError(f"{fn}: '{name}' holds no Gram matrices")
        if any(not isinstance(g, torch.Tensor) or g.ndim != 3 for g in grams):
            raise InvalidConfigError(f"{fn}: '{name}' must be a list of tensors (B, C, C)")
        if len({g.shape[0] for g in grams}) != 1:
            raise InvalidConfigError(f"{fn}: the layers of '{name}' have different batch sizes")
        flat = flatten_grams(grams)
    flat = flat.detach().to("cpu", torch.float64)
    if flat.shape[0] == 0 or flat.shape[1] == 0:
        raise InvalidConfigError(f"{fn}: '{name}' is an empty set (shape {tuple(flat.shape)})")
    if not torch.isfinite(flat).all():
        raise InvalidConfigError(f"{fn}: '{name}' holds NaN or infinite values")
    return flat


def style_loss(
    grams_a: Sequence[torch.Tensor] | torch.Tensor, grams_b: Sequence[torch.Tensor] | torch.Tensor
) -> torch.Tensor:
    """Per-image style loss ``Σ_layers ‖G_a − G_b‖²_F`` of paired images (§4.5, "Style Loss (base model)").

    Args:
        grams_a: Grams of the fine-tuned model's images: the list from :func:`gram_matrices` (per layer
            ``(B, C, C)``) or :func:`flatten_grams`'s ``(B, K)``.
        grams_b: the same for the base model's images, image k with the same prompt and seed as ``grams_a``'s.

    Returns:
        float64 tensor ``(B,)`` (CPU); the paper's metric is its mean. Lower is better.
    """
    fn = "style_loss"
    a = _gram_rows(grams_a, "grams_a", fn)
    b = _gram_rows(grams_b, "grams_b", fn)
    if a.shape != b.shape:
        raise InvalidConfigError(
            f"{fn}: images are paired, but 'grams_a' has shape {tuple(a.shape)} and 'grams_b' {tuple(b.shape)}"
        )
    return ((a - b) ** 2).sum(dim=1)


def style_loss_vs_dataset(
    grams_gen: Sequence[torch.Tensor] | torch.Tensor, grams_ref: Sequence[torch.Tensor] | torch.Tensor
) -> float:
    """Mean of ``‖g_i − h_j‖²`` over all generated × dataset pairs (§4.5, "Style Loss vs dataset").

    Computed in closed form as ``‖μ_g − μ_h‖² + var_g + var_h`` with ``var = (1/n) Σ ‖g − μ‖²``.

    Args:
        grams_gen: Grams of the generated images (list of ``(n, C, C)`` or flat ``(n, K)``).
        grams_ref: Grams of the dataset images (list of ``(m, C, C)`` or flat ``(m, K)``).
    """
    fn = "style_loss_vs_dataset"
    g = _gram_rows(grams_gen, "grams_gen", fn)
    h = _gram_rows(grams_ref, "grams_ref", fn)
    if g.shape[1] != h.shape[1]:
        raise InvalidConfigError(
            f"{fn}: Gram widths differ: 'grams_gen' has K={g.shape[1]}, 'grams_ref' has K={h.shape[1]}"
        )
    mg, mh = g.mean(dim=0), h.mean(dim=0)
    var_g = ((g - mg) ** 2).sum() / g.shape[0]
    var_h = ((h - mh) ** 2).sum() / h.shape[0]
    return float(((mg - mh) ** 2).sum() + var_g + var_h)


# --------------------------------------------------------------------------------------- Fréchet distance
def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix through its eigendecomposition (negative round-off clipped)."""
    w, v = np.linalg.eigh(s)
    root: np.ndarray = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    return root


def frechet_distance(ref: FeatureArray, gen: FeatureArray) -> float:
    """Fréchet distance ``‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂)`` of two feature sets (§4.6, dgm-eval).

    Means and unbiased covariances (``np.cov``) of the **raw** features. ``tr √(Σ₁Σ₂)`` is the sum of the
    square roots of the eigenvalues of the symmetric PSD matrix ``Σ₁^½ Σ₂ Σ₁^½`` (the same eigenvalues as
    ``Σ₁Σ₂``); when ``m·n ≤ D²`` it is computed instead as the nuclear norm of ``X̃ᵀỸ/√((m−1)(n−1))``, ``X̃``, ``Ỹ``
    the centred sets (the same number: ``Σ₁Σ₂ = AAᵀBBᵀ`` has the non-zero eigenvalues of ``(AᵀB)(AᵀB)ᵀ``).

    Args:
        ref: reference features ``(m, D)``, m ≥ 2.
        gen: generated features ``(n, D)``, n ≥ 2.

    Returns:
        The distance (≥ 0 up to round-off); lower is better.
    """
    fn = "frechet_distance"
    x = _features(ref, "ref", fn)
    y = _features(gen, "gen", fn)
    _same_width(x, y, ("ref", "gen"), fn)
    for name, arr in (("ref", x), ("gen", y)):
        if arr.shape[0] < 2:
            raise InvalidConfigError(f"{fn}: '{name}' needs at least 2 rows for a covariance, got {arr.shape[0]}")
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    mx, my = x.mean(axis=0), y.mean(axis=0)
    a = (x - mx) / math.sqrt(m - 1)  # Σ₁ = aᵀa
    b = (y - my) / math.sqrt(n - 1)  # Σ₂ = bᵀb
    if m * n <= d * d:
        tr_sqrt = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
    else:
        s1_half = _sqrtm_psd(a.T @ a)
        mid = s1_half @ (b.T @ b) @ s1_half
        tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((mid + mid.T) / 2), 0.0, None)).sum())
    diff = mx - my
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * tr_sqrt)
