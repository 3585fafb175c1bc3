"""Training noise: offset noise, timesteps, epsilon / v targets, min-SNR-γ weights, checked against diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lyco_core.errors import InvalidConfigError
from lyco_trainer import noise


def _sd_scheduler(prediction: str = "epsilon", zero_snr: bool = False) -> DDPMScheduler:
    """The SD 1.x / 2.x training schedule (scaled_linear 0.00085 → 0.012, 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction,
        rescale_betas_zero_snr=zero_snr,
    )


def _alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of the SD schedule written out (float64): β_t = linspace(√β0, √β1, T)², ᾱ_t = Π (1 − β)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# ---------------------------------------------------------------------------------------------------------------
# noise and timesteps


def test_noise_without_offset_is_plain_gaussian_and_seeded() -> None:
    lat = torch.zeros(2, 4, 8, 8)
    n1 = noise.sample_noise(lat, 0.0, torch.Generator().manual_seed(7))
    n2 = noise.sample_noise(lat, 0.0, torch.Generator().manual_seed(7))
    assert n1.shape == lat.shape
    assert n1.dtype == lat.dtype
    torch.testing.assert_close(n1, n2, rtol=0, atol=0)
    torch.testing.assert_close(n1, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)))
    n3 = noise.sample_noise(lat, 0.0, torch.Generator().manual_seed(8))
    assert not torch.equal(n1, n3)


def test_noise_offset_adds_a_per_channel_constant() -> None:
    b, c, offset = 64, 4, 0.1
    lat = torch.zeros(b, c, 16, 16)
    base = noise.sample_noise(lat, 0.0, torch.Generator().manual_seed(3))
    off = noise.sample_noise(lat, offset, torch.Generator().manual_seed(3))
    extra = off - base  # the same per-element draw comes first, so the difference is the offset term
    # constant over the spatial dims of each (sample, channel)
    per_bc = extra[:, :, :1, :1]
    torch.testing.assert_close(extra, per_bc.expand_as(extra), rtol=0, atol=1e-6)
    # offset · N(0, 1): 256 draws with standard deviation ≈ offset, mean ≈ 0
    vals = per_bc.flatten()
    assert vals.std().item() == pytest.approx(offset, rel=0.2)
    assert abs(vals.mean().item()) < 3 * offset / 16
    # different per sample and per channel
    assert vals.unique().numel() == b * c


def test_noise_follows_latent_dtype() -> None:
    lat = torch.zeros(1, 4, 4, 4, dtype=torch.bfloat16)
    n = noise.sample_noise(lat, 0.05, torch.Generator().manual_seed(0))
    assert n.dtype == torch.bfloat16
    with pytest.raises(InvalidConfigError, match="noise_offset"):
        noise.sample_noise(lat, -0.1, None)


def test_timesteps_uniform_in_range_and_seeded() -> None:
    sched = _sd_scheduler()
    t = noise.sample_timesteps(4000, sched, torch.Generator().manual_seed(1))
    assert t.dtype == torch.long
    assert t.shape == (4000,)
    assert int(t.min()) >= 0
    assert int(t.max()) <= 999
    assert int(t.min()) < 10
    assert int(t.max()) > 989
    assert t.float().mean().item() == pytest.approx(499.5, rel=0.05)
    t2 = noise.sample_timesteps(4000, sched, torch.Generator().manual_seed(1))
    torch.testing.assert_close(t, t2, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# noisy latents and targets


def test_noisy_latents_match_the_ddpm_forward_process() -> None:
    sched = _sd_scheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    xt = noise.add_noise(sched, x0, eps, t)
    ac = _alphas_cumprod()[t].view(3, 1, 1, 1)
    torch.testing.assert_close(xt, ac.sqrt() * x0 + (1 - ac).sqrt() * eps, rtol=1e-6, atol=1e-6)


def test_epsilon_target_is_the_noise() -> None:
    sched = _sd_scheduler()
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    out = noise.training_target(sched, x0, eps, torch.tensor([10, 900]), "epsilon")
    assert out is eps


@pytest.mark.parametrize("name", ["v", "v_prediction"])
def test_v_target_is_the_velocity(name: str) -> None:
    sched = _sd_scheduler("v_prediction")
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 400, 998])
    v = noise.training_target(sched, x0, eps, t, name)
    ac = _alphas_cumprod()[t].view(3, 1, 1, 1)
    # Salimans & Ho 2022: v = √ᾱ ε − √(1−ᾱ) x0, and x0 = √ᾱ x_t − √(1−ᾱ) v recovers the clean latents.
    torch.testing.assert_close(v, ac.sqrt() * eps - (1 - ac).sqrt() * x0, rtol=1e-6, atol=1e-6)
    xt = noise.add_noise(sched, x0, eps, t)
    torch.testing.assert_close(ac.sqrt() * xt - (1 - ac).sqrt() * v, x0, rtol=1e-5, atol=1e-5)


def test_unknown_prediction_is_an_error() -> None:
    sched = _sd_scheduler()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(InvalidConfigError, match=r"model\.prediction.*'sample'"):
        noise.training_target(sched, x, x, torch.tensor([1]), "sample")
    with pytest.raises(InvalidConfigError, match=r"model\.prediction"):
        noise.loss_weights(sched, torch.tensor([1]), 5.0, "x0")


# ---------------------------------------------------------------------------------------------------------------
# min-SNR-γ


def test_snr_matches_diffusers_and_the_schedule() -> None:
    sched = _sd_scheduler()
    t = torch.arange(0, 1000, 37)
    ours = noise.snr(sched, t)
    torch.testing.assert_close(ours, compute_snr(sched, t), rtol=1e-4, atol=0)
    ac = _alphas_cumprod()[t]
    torch.testing.assert_close(ours.double(), ac / (1 - ac), rtol=1e-4, atol=0)  # ᾱ is float32 in diffusers


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_the_diffusers_training_example(prediction: str, gamma: float) -> None:
    sched = _sd_scheduler("epsilon" if prediction == "epsilon" else "v_prediction")
    t = torch.tensor([0, 1, 50, 100, 250, 500, 750, 999])
    w = noise.loss_weights(sched, t, gamma, prediction)
    assert w.shape == (8,)
    assert w.dtype == torch.float32

    # examples/text_to_image/train_text_to_image.py, the min-SNR branch
    snr = compute_snr(sched, t)
    mse_loss_weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if prediction == "epsilon":
        ref = mse_loss_weights / snr
    else:
        ref = mse_loss_weights / (snr + 1)
    torch.testing.assert_close(w, ref, rtol=1e-4, atol=1e-7)

    # and the shape of the curve: capped at low noise (SNR > γ), 1 (eps) / SNR/(SNR+1) (v) at high noise
    snr0 = float(snr[0])
    assert snr0 > gamma
    assert float(w[0]) == pytest.approx(gamma / snr0 if prediction == "epsilon" else gamma / (snr0 + 1), rel=1e-4)
    last = float(snr[-1])
    assert last < gamma
    assert float(w[-1]) == pytest.approx(1.0 if prediction == "epsilon" else last / (last + 1), rel=1e-4)


def test_min_snr_none_is_ones() -> None:
    sched = _sd_scheduler()
    t = torch.tensor([3, 999, 5])
    torch.testing.assert_close(noise.loss_weights(sched, t, None, "epsilon"), torch.ones(3))
    torch.testing.assert_close(noise.loss_weights(sched, t, None, "v"), torch.ones(3))


def test_min_snr_zero_terminal_snr_stays_finite() -> None:
    sched = _sd_scheduler("v_prediction", zero_snr=True)
    t = torch.tensor([999, 998])
    assert float(sched.alphas_cumprod[999]) == 0.0
    w_eps = noise.loss_weights(sched, t, 5.0, "epsilon")
    w_v = noise.loss_weights(sched, t, 5.0, "v")
    assert torch.isfinite(w_eps).all()
    assert torch.isfinite(w_v).all()
    assert float(w_eps[0]) == 1.0
    assert float(w_v[0]) == 0.0


def test_weighted_mse() -> None:
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    plain = noise.weighted_mse(pred, target)
    torch.testing.assert_close(plain, torch.nn.functional.mse_loss(pred, target))
    w = torch.tensor([1.0, 0.0, 2.0])
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(noise.weighted_mse(pred.half(), target.half(), w), (per * w).mean(), rtol=2e-3, atol=0)
