"""Optimisers (AdamW, AdamW 8-bit gate, Lion, Prodigy) and learning-rate schedules."""

from __future__ import annotations

import io
import itertools
import math
from typing import Any

import pytest
import torch
from diffusers.optimization import get_scheduler

from lyco_core.errors import InvalidConfigError
from lyco_trainer.config import OptimizerConfig, SchedulerConfig
from lyco_trainer.optim import Lion, Prodigy, current_lrs, make_optimizer
from lyco_trainer.schedule import make_scheduler

# ---------------------------------------------------------------------------------------------------------------
# helpers


def _roundtrip(sd: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run reads back: the state dict through torch.save / torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    out: dict[str, Any] = torch.load(buf, weights_only=True)
    return out


def _quad_grad(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Gradient of Σ (p − c)²."""
    return 2.0 * (p - c)


# ---------------------------------------------------------------------------------------------------------------
# Lion


def test_lion_matches_hand_computed_steps() -> None:
    p = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    lr, wd = 0.01, 0.5
    opt = make_optimizer(OptimizerConfig(name="lion", weight_decay=wd), [{"params": [p], "lr": lr}])
    assert isinstance(opt, Lion)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)  # Lion's defaults when the config leaves betas unset

    # Gradients that change sign, so the interpolation weights (β1 for the update, β2 for the momentum) matter.
    grads = [
        torch.tensor([1.0, -1.0, 0.5, 2.0]),
        torch.tensor([-0.5, 0.05, -3.0, 0.1]),
        torch.tensor([-0.02, 0.3, 1.0, -4.0]),
    ]
    b1, b2 = 0.9, 0.99
    ref = p.detach().double().clone()
    m = torch.zeros(4, dtype=torch.float64)
    disagreed = False
    for g in grads:
        gd = g.double()
        disagreed |= bool((torch.sign(b1 * m + (1 - b1) * gd) != torch.sign(gd)).any())
        # Chen et al. 2023, Algorithm 2: θ ← θ − η(sign(β1 m + (1−β1) g) + λ θ); m ← β2 m + (1−β2) g.
        ref = ref - lr * (torch.sign(b1 * m + (1 - b1) * gd) + wd * ref)
        m = b2 * m + (1 - b2) * gd

        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach().double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)
    assert disagreed  # some update went against its gradient: the momentum is really used


def test_lion_uses_configured_betas() -> None:
    p = torch.zeros(3, requires_grad=True)
    cfg = OptimizerConfig(name="lion", betas=(0.95, 0.98))
    opt = make_optimizer(cfg, [{"params": [p], "lr": 1e-4}])
    assert opt.param_groups[0]["betas"] == (0.95, 0.98)


# ---------------------------------------------------------------------------------------------------------------
# Prodigy


def test_prodigy_matches_hand_computed_steps() -> None:
    """Five steps of Mishchenko & Defazio's Algorithm (Adam form, no bias correction, decoupled decay) written out."""
    p = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([2.0, -3.0, 4.0], dtype=torch.float64)
    b1, b2, eps, wd, lr = 0.9, 0.999, 1e-8, 0.01, 0.5
    b3 = math.sqrt(b2)
    opt = make_optimizer(OptimizerConfig(name="prodigy", weight_decay=wd), [{"params": [p], "lr": lr}])
    assert isinstance(opt, Prodigy)
    d0 = 1e-6
    assert opt.d == d0

    x0 = p.detach().clone()
    x = x0.clone()
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    s = torch.zeros(3, dtype=torch.float64)
    d, numer = d0, 0.0
    ds = []
    for _ in range(5):
        g = _quad_grad(x, c)
        dlr = d * lr
        numer = b3 * numer + (d / d0) * dlr * float(torch.dot(g, x0 - x))
        m = b1 * m + d * (1 - b1) * g
        v = b2 * v + d * d * (1 - b2) * g * g
        s = b3 * s + (d / d0) * dlr * g
        d_hat = numer / float(s.abs().sum())
        new_d = max(d, d_hat)  # the paper's d_{k+1} = max(d_k, d̂_{k+1}) (no growth-rate cap)
        x = x - wd * dlr * x
        x = x - dlr * m / (v.sqrt() + d * eps)
        d = new_d
        ds.append(d)

        opt.zero_grad()
        ((p - c) ** 2).sum().backward()
        opt.step()
        assert opt.d == pytest.approx(d, rel=1e-12)
    torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-15)
    assert ds[0] == d0  # step 1 has no displacement yet: d stays d0
    assert ds[-1] > 5 * d0
    assert all(b >= a for a, b in itertools.pairwise(ds))


def test_prodigy_converges_on_quadratic_without_tuning() -> None:
    h = torch.tensor([1.0, 10.0, 0.1, 3.0])
    c = torch.tensor([10.0, -5.0, 3.0, 20.0])
    x = torch.zeros(4, requires_grad=True)
    opt = make_optimizer(OptimizerConfig(name="prodigy", weight_decay=0.0), [{"params": [x], "lr": 1.0}])
    assert isinstance(opt, Prodigy)

    def f() -> torch.Tensor:
        return 0.5 * (h * (x - c) ** 2).sum()

    f0 = float(f().detach())
    d_seen = []
    for _ in range(300):
        opt.zero_grad()
        f().backward()
        opt.step()
        d_seen.append(opt.d)
    assert float(f().detach()) < 1e-6 * f0
    # d grows from d0 = 1e-6 to the scale of the distance to the optimum (|c|∞ = 20), monotonically.
    assert d_seen[-1] > 1e5 * 1e-6
    assert all(b >= a for a, b in itertools.pairwise(d_seen))
    assert current_lrs(opt) == [pytest.approx(opt.d * 1.0)]


def test_prodigy_group_lr_scales_the_step() -> None:
    """Separate UNet / text-encoder learning rates: the group at lr 0.5 moves half as far on identical gradients."""
    a = torch.ones(4, requires_grad=True)
    b = torch.ones(4, requires_grad=True)
    opt = make_optimizer(
        OptimizerConfig(name="prodigy", weight_decay=0.0),
        [{"params": [a], "lr": 1.0, "name": "unet"}, {"params": [b], "lr": 0.5, "name": "text_encoder"}],
    )
    for _ in range(5):
        opt.zero_grad()
        ((a - 3.0) ** 2).sum().backward()
        ((b - 3.0) ** 2).sum().backward()
        opt.step()
    assert opt.d > 1e-6
    assert [g["name"] for g in opt.param_groups] == ["unet", "text_encoder"]
    with pytest.warns(UserWarning, match=r"train\.unet_lr"):
        make_optimizer(OptimizerConfig(name="prodigy"), [{"params": [a], "lr": 1e-4}])
    moved_a = float((a.detach() - 1.0).abs().sum())
    moved_b = float((b.detach() - 1.0).abs().sum())
    assert moved_b == pytest.approx(0.5 * moved_a, rel=0.15)
    assert moved_b < 0.7 * moved_a


# ---------------------------------------------------------------------------------------------------------------
# AdamW / 8-bit / groups


def test_adamw_groups_keep_their_lr_and_first_step_is_lr_sized() -> None:
    unet = torch.zeros(5, requires_grad=True)
    te = torch.zeros(5, requires_grad=True)
    frozen = torch.zeros(5, requires_grad=False)
    opt = make_optimizer(
        OptimizerConfig(name="adamw", weight_decay=0.0),
        [{"params": [unet, frozen], "lr": 1e-3}, {"params": [te], "lr": 2e-4}],
    )
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-4]
    assert len(opt.param_groups[0]["params"]) == 1  # the frozen tensor is not trained
    opt.zero_grad()
    ((unet - 1.0) ** 2).sum().backward()
    ((te + 1.0) ** 2).sum().backward()
    opt.step()
    # Adam's first step is lr · g/|g| (bias-corrected moments): +lr towards 1, −lr towards −1.
    torch.testing.assert_close(unet.detach(), torch.full((5,), 1e-3), rtol=1e-4, atol=0)
    torch.testing.assert_close(te.detach(), torch.full((5,), -2e-4), rtol=1e-4, atol=0)


def test_adamw8bit_needs_cuda() -> None:
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(InvalidConfigError, match=r"optimizer\.name") as ei:
        make_optimizer(OptimizerConfig(name="adamw8bit"), [{"params": [p], "lr": 1e-4}])
    assert "\n" not in str(ei.value)


def test_no_trainable_parameters_is_an_error() -> None:
    p = torch.zeros(3, requires_grad=False)
    with pytest.raises(InvalidConfigError, match="no trainable parameters"):
        make_optimizer(OptimizerConfig(), [{"params": [p], "lr": 1e-4}])
    with pytest.raises(InvalidConfigError, match=r"'te'.*'lr'"):
        make_optimizer(OptimizerConfig(), [{"params": [torch.zeros(1, requires_grad=True)], "name": "te"}])


# ---------------------------------------------------------------------------------------------------------------
# resume: optimiser + scheduler state dicts


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(4, 6, generator=g), torch.randn(4, 2, generator=g)


def _build(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = _model()
    lr = 1.0 if name == "prodigy" else 1e-2
    groups = [
        {"params": list(model[0].parameters()), "lr": lr},
        {"params": list(model[2].parameters()), "lr": lr * (1.0 if name == "prodigy" else 0.5)},
    ]
    opt = make_optimizer(OptimizerConfig(name=name), groups)  # type: ignore[arg-type]
    sched = make_scheduler(SchedulerConfig(name="cosine", warmup_steps=2), opt, total_steps=10)
    return model, opt, sched


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: range) -> None:
    for i in steps:
        x, y = _batch(i)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("name", ["adamw", "lion", "prodigy"])
def test_state_dicts_roundtrip_for_resume(name: str) -> None:
    straight, opt, sched = _build(name)
    _train(straight, opt, sched, range(10))

    first, opt1, sched1 = _build(name)
    _train(first, opt1, sched1, range(6))
    saved = _roundtrip({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()})

    resumed, opt2, sched2 = _build(name)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sched2.last_epoch == 6
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt1.param_groups]
    if name == "prodigy":
        assert isinstance(opt2, Prodigy)
        assert opt2.d == opt1.param_groups[0]["d"] > 1e-6
    _train(resumed, opt2, sched2, range(6, 10))

    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the step moved the weights at all (the comparison above is not vacuous)
    assert not torch.equal(next(straight.parameters()), next(_model().parameters()))


# ---------------------------------------------------------------------------------------------------------------
# schedules


def _lrs(name: str, warmup: int, total: int, base: float = 1.0) -> list[float]:
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=base)
    sched = make_scheduler(SchedulerConfig(name=name, warmup_steps=warmup), opt, total)  # type: ignore[arg-type]
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_schedule_values_at_key_steps(name: str) -> None:
    warmup, total = 4, 20
    lrs = _lrs(name, warmup, total, base=2.0)
    # warm-up: linear from 0 (diffusers convention); half way through the warm-up: half the lr
    assert lrs[0] == 0.0
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[warmup] == pytest.approx(2.0)
    middle = (warmup + total) // 2  # 12: half way through the decay
    expected_mid = {"constant": 2.0, "cosine": 1.0, "linear": 1.0}[name]
    assert lrs[middle] == pytest.approx(expected_mid)
    expected_end = {"constant": 2.0, "cosine": 0.0, "linear": 0.0}[name]
    assert lrs[total] == pytest.approx(expected_end, abs=1e-12)
    # the last step actually taken (total − 1)
    expected_last = {
        "constant": 2.0,
        "cosine": 2.0 * 0.5 * (1 + math.cos(math.pi * 15 / 16)),
        "linear": 2.0 * 1 / 16,
    }[name]
    assert lrs[total - 1] == pytest.approx(expected_last)


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 7), (3, 11)])
def test_schedule_matches_diffusers(name: str, warmup: int, total: int) -> None:
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    ref_name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[name]
    ref = get_scheduler(ref_name, opt, num_warmup_steps=warmup, num_training_steps=total)
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _lrs(name, warmup, total, base=0.1)[:total] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_schedule_scales_every_group_alike() -> None:
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = make_optimizer(OptimizerConfig(), [{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 5e-5}])
    sched = make_scheduler(SchedulerConfig(name="linear", warmup_steps=2), opt, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    lr_a, lr_b = (g["lr"] for g in opt.param_groups)
    assert lr_a == pytest.approx(1e-4 * 5 / 8)
    assert lr_b == pytest.approx(lr_a / 2)


def test_schedule_bad_lengths() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(InvalidConfigError, match=r"scheduler\.warmup_steps"):
        make_scheduler(SchedulerConfig(warmup_steps=50), opt, 10)
    with pytest.raises(InvalidConfigError, match="optimiser steps"):
        make_scheduler(SchedulerConfig(), opt, 0)
