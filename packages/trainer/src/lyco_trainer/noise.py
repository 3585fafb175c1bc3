"""DDPM training noise: timesteps, noise (with offset), noisy latents, epsilon / v targets, min-SNR-γ weights.

``scheduler`` is a diffusers ``DDPMScheduler`` (anything with ``alphas_cumprod``, ``config.num_train_timesteps``,
``add_noise`` and ``get_velocity``). With ``ᾱ_t = alphas_cumprod[t]``:

- noisy latents ``x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · ε``;
- targets: epsilon-prediction ``ε``; v-prediction ``v = √ᾱ_t · ε − √(1−ᾱ_t) · x0``;
- ``SNR(t) = ᾱ_t / (1 − ᾱ_t)``.

Random draws take an explicit ``torch.Generator``: a run is reproducible from its seed, and a resumed run continues
the same stream when the generator's state is saved.
"""

from __future__ import annotations

from typing import Any

import torch

from lyco_core.errors import InvalidConfigError

PREDICTIONS = ("epsilon", "v", "v_prediction")


def _draw(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal of ``shape``, drawn on the generator's device (same numbers whatever device trains)."""
    device = generator.device if generator is not None else like.device
    out = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return out.to(device=like.device, dtype=like.dtype)


def sample_noise(latents: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise shaped like ``latents`` (B, C, h, w), plus the noise offset.

    With ``offset > 0`` a per-sample, per-channel constant ``offset · N(0, 1)`` of shape (B, C, 1, 1) is added
    (crosslabs' "noise offset", as sd-scripts does it): it lets the model learn to change an image's mean
    brightness. The per-element noise is drawn first, then the offsets, from the same generator.
    """
    if offset < 0:
        raise InvalidConfigError(f"train.noise_offset must be >= 0, got {offset}")
    noise = _draw(tuple(latents.shape), latents, generator)
    if offset > 0:
        b, c = latents.shape[:2]
        extra = (1,) * (latents.dim() - 2)
        noise = noise + offset * _draw((b, c, *extra), latents, generator)
    return noise


def sample_timesteps(
    batch: int, scheduler: Any, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``batch`` timesteps uniform in ``[0, num_train_timesteps)``; int64 (B,) on ``device`` (default: the
    generator's device)."""
    n = int(scheduler.config.num_train_timesteps)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    t = torch.randint(0, n, (batch,), generator=generator, device=gen_device, dtype=torch.long)
    return t if device is None else t.to(device)


def add_noise(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``x_t = √ᾱ_t · latents + √(1−ᾱ_t) · noise`` (the scheduler's forward process), shape of ``latents``."""
    out: torch.Tensor = scheduler.add_noise(latents, noise, timesteps)
    return out


def _is_v(prediction: str) -> bool:
    if prediction not in PREDICTIONS:
        raise InvalidConfigError(f"model.prediction: unknown prediction type {prediction!r}; expected epsilon or v")
    return prediction != "epsilon"


def training_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction: str
) -> torch.Tensor:
    """What the UNet should output for ``x_t``: ``noise`` (epsilon) or the velocity (v, via
    ``scheduler.get_velocity``); shape of ``latents``."""
    if _is_v(prediction):
        out: torch.Tensor = scheduler.get_velocity(latents, noise, timesteps)
        return out
    return noise


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """``ᾱ_t / (1 − ᾱ_t)`` at ``timesteps``: float32 (B,) on the timesteps' device."""
    ac = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps.long()]
    return (ac / (1.0 - ac)).float()


def loss_weights(scheduler: Any, timesteps: torch.Tensor, min_snr_gamma: float | None, prediction: str) -> torch.Tensor:
    """Per-sample loss weights (B,) float32: min-SNR-γ (Hang et al. 2023) or ones when ``min_snr_gamma`` is None.

    epsilon: ``min(SNR, γ) / SNR``; v: ``min(SNR, γ) / (SNR + 1)`` — the diffusers training examples' formula.
    (A zero-SNR timestep under epsilon gets weight 1, the limit of the formula, instead of 0/0.)
    """
    v = _is_v(prediction)
    if min_snr_gamma is None:
        return torch.ones(timesteps.shape[0], dtype=torch.float32, device=timesteps.device)
    if min_snr_gamma <= 0:
        raise InvalidConfigError(f"train.min_snr_gamma must be > 0, got {min_snr_gamma}")
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=float(min_snr_gamma))
    if v:
        return clipped / (s + 1.0)
    return torch.where(s > 0, clipped / s.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(s))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ``weights[b] · mean((pred[b] − target[b])²)``, computed in float32; a 0-d tensor."""
    per = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    per = per.mean(dim=tuple(range(1, per.dim())))
    if weights is not None:
        per = per * weights.to(per.device, torch.float32)
    return per.mean()
