"""The training loop: ``train(cfg)`` fine-tunes a base model with a Lyco adapter (or natively) on a dataset.

Order of work (everything that can fail on bad input fails before a model is loaded):

1. seed python/numpy/torch; discover the data (:func:`lyco_trainer.data.discover`) and plan the epochs;
   refuse to overwrite an earlier run's outputs unless ``overwrite`` / ``resume``;
2. load the base (:func:`lyco_trainer.models.load_base`); create the adapter network over the UNet (and the
   text encoder(s) with ``network.train_text_encoder``) and freeze the base, or for ``native`` unfreeze the UNet
   (and text encoders); build the optimiser (``unet_lr`` / ``text_encoder_lr`` groups) and the schedule;
3. cache VAE latents (memory or disk) and, when the text encoders are frozen, their outputs;
4. restore a state when resuming (tensors, optimiser, schedule, RNG states, position in the data order);
5. per optimiser step: ``gradient_accumulation`` micro-batches of DDPM noising at uniform timesteps, the
   epsilon/v target, MSE with min-SNR-γ weights; clip to ``max_grad_norm``; step; report a ``step`` event;
   save adapters / states / samples when due; stop (with a resumable state) when the callback asks.

Randomness that decides *what* is trained (caption shuffle/dropout, noise, timesteps) comes from generators
seeded by (seed, epoch, batch index), and the data order from :func:`lyco_trainer.data.plan_epoch` (a function
of (seed, epoch)); the global RNG states (adapter dropout) are saved in states. So a resumed run retraces
exactly the steps an uninterrupted run takes.

Several processes (``accelerate launch`` / ``torchrun``, same config): each optimiser step takes
``gradient_accumulation × processes`` micro-batches; process r trains micro-batches r, r + world, …, gradients are
summed over processes (nccl on CUDA, gloo on CPU) before the step, so N processes equal one process with N times
the accumulation. Only process 0 reports events and writes files and states.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import resource
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from lyco_core.errors import FileExistsLycoError, InvalidConfigError

from . import state as st
from .callbacks import CallbackList, ProgressEvent, tensorboard_callback
from .config import TrainConfig
from .output import DTYPES, RunFacts, adapter_path, build_metadata, optimizer_label, save_adapter, save_native

log = logging.getLogger("lyco_trainer")

_MIX = 1_000_003


# --------------------------------------------------------------------------------------------- results / plan
@dataclass
class TrainResult:
    """What a run did. ``final_path`` is the adapter file (a pipeline folder for ``native``) written at the end;
    None when the run was cancelled. ``state_path`` is the resumable state written on cancel (or the newest)."""

    output_dir: Path
    steps: int
    total_steps: int
    epochs: int
    losses: list[float] = field(default_factory=list)
    cancelled: bool = False
    final_path: Path | None = None
    saved: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    state_path: Path | None = None
    resumed_from: Path | None = None
    network: Any = None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


class TrainPlan(BaseModel):
    """What a run will do, known before any model is loaded (``lyco train --dry-run`` prints it)."""

    model_config = ConfigDict(frozen=True)

    images: int
    samples_per_epoch: int
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    batch_size: int
    gradient_accumulation: int
    processes: int = 1
    buckets: dict[str, int]
    concepts: dict[str, dict[str, Any]]
    algo: str
    preset: str
    output: str
    warnings: list[str]
    data_report: list[str]

    def lines(self) -> list[str]:
        out = list(self.data_report)
        out.append("batches per epoch by bucket (WxH): " + ", ".join(f"{k}: {v}" for k, v in self.buckets.items()))
        out.append(
            f"plan: {self.epochs} epoch(s) × {self.steps_per_epoch} step(s) → {self.total_steps} optimiser steps "
            f"(batch {self.batch_size}, gradient accumulation {self.gradient_accumulation}, "
            f"{self.batches_per_epoch} batches/epoch"
            + (f", {self.processes} processes" if self.processes > 1 else "")
            + ")"
        )
        out.append(f"network: {self.algo} (preset {self.preset}); final output: {self.output}")
        return out


def _report_lines(report: Any) -> tuple[list[str], list[str]]:
    """(summary lines, warnings) of a data report, whatever its exact shape."""
    if report is None:
        return [], []
    warnings = [str(w) for w in getattr(report, "warnings", []) or []]
    for name in ("summary_lines", "lines"):
        fn = getattr(report, name, None)
        if callable(fn):
            return [str(x) for x in fn()], warnings
    skipped = getattr(report, "skipped", None) or []
    lines = [f"skipped {len(skipped)} file(s)"] if skipped else []
    return lines, warnings


def _data_api() -> Any:
    from . import data

    return data


def plan_run(cfg: TrainConfig, world: int = 1) -> tuple[Any, TrainPlan]:
    """Discover the data and work out the run's size (errors name the folder/key; no model is loaded).

    ``world`` processes (``accelerate launch`` / ``torchrun``) share each optimiser step's micro-batches."""
    data = _data_api()
    dataset = data.discover(cfg.data)
    batches = data.plan_epoch(dataset, cfg.data, cfg.train.batch_size, cfg.train.seed, 0)
    if not batches:
        raise InvalidConfigError("data: no batch to train on (is the dataset empty?)")
    n_batches = len(batches)
    steps_per_epoch = math.ceil(n_batches / (cfg.train.gradient_accumulation * world))
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    buckets: dict[str, int] = {}
    for b in batches:
        key = f"{b.bucket[0]}x{b.bucket[1]}"
        buckets[key] = buckets.get(key, 0) + 1
    per_epoch: dict[str, int] = {}
    for b in batches:
        for it in b.items:
            per_epoch[it.concept.name] = per_epoch.get(it.concept.name, 0) + 1
    images: dict[str, int] = {}
    for it in dataset.items:
        images[it.concept.name] = images.get(it.concept.name, 0) + 1
    concepts = {
        c.name: {"images": images.get(c.name, 0), "repeats": c.repeats, "samples": per_epoch.get(c.name, 0),
                 "trigger": c.trigger}
        for c in dataset.concepts
    }
    lines, warnings = _report_lines(getattr(dataset, "report", None))
    plan = TrainPlan(
        images=len(dataset.items),
        samples_per_epoch=sum(len(b.items) for b in batches),
        batches_per_epoch=n_batches,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.train.epochs,
        total_steps=total,
        batch_size=cfg.train.batch_size,
        gradient_accumulation=cfg.train.gradient_accumulation,
        processes=world,
        buckets=buckets,
        concepts=concepts,
        algo=cfg.network.algo,
        preset=cfg.network.preset,
        output=str(adapter_path(cfg)),
        warnings=warnings,
        data_report=lines,
    )
    return dataset, plan


# --------------------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _derived_seed(seed: int, epoch: int, batch: int) -> int:
    return ((seed * _MIX + epoch) * _MIX + batch) % (2**63 - 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError(f"train.device: {name!r} but CUDA is not available")
    return dev


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, else the process's peak resident set size (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass
class Dist:
    """This process's place in a multi-process run (``accelerate launch`` / ``torchrun`` set WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); world 1 without them."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    started: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group when launched as several processes (nccl on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if dist.is_initialized():
        return Dist(world, rank, local, started=False)
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(world, rank, local, started=True)


def _te_roles(family: str, n: int) -> list[str]:
    if n == 1:
        return ["te"]
    return ["te1", "te2"] if family == "sdxl" else [f"te{i + 1}" for i in range(n)]


def _check_outputs(cfg: TrainConfig, resuming: bool, overwrite: bool, delete: bool = True) -> None:
    """A fresh run must not silently mix with an earlier run's files in ``output.dir``; with ``overwrite`` the
    earlier run's states are deleted (by the main process only: ``delete``)."""
    if resuming:
        return
    final = adapter_path(cfg)
    states = st.list_states(cfg.output.dir)
    if overwrite:
        for _, p in states if delete else []:
            shutil.rmtree(p, ignore_errors=True)
        return
    if final.exists():
        raise FileExistsLycoError(f"{final} exists; pass --force to overwrite it or --resume to continue that run")
    if states:
        raise FileExistsLycoError(
            f"{cfg.output.dir} holds resumable states of an earlier run ({states[-1][1].name}); "
            "pass --resume to continue it or --force to start over"
        )


# --------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One run. :func:`train` is the usual entry point; the object is exposed for tests and services."""

    def __init__(self, cfg: TrainConfig, callback: Any = None, *, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.overwrite = overwrite
        self.user_callback = callback
        self.dist = init_distributed(cfg.train.device)
        self.device = resolve_device(cfg.train.device)
        if self.dist.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        mp = cfg.train.mixed_precision
        self.amp_dtype: torch.dtype | None = None
        if mp != "no":
            if self.device.type != "cuda":
                log.warning("train.mixed_precision=%s needs a CUDA device; training in fp32 on %s", mp, self.device)
            else:
                self.amp_dtype = torch.float16 if mp == "fp16" else torch.bfloat16
        self.native = cfg.network.algo == "native"
        self.train_te = cfg.network.train_text_encoder
        self.models: Any = None
        self.network: Any = None
        self.dataset: Any = None
        self.plan: TrainPlan | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: Any = None
        self.latent_cache: Any = None
        self.text_cache: Any = None
        self.te_components: list[tuple[str, nn.Module]] = []
        self.callbacks = CallbackList([])
        self.losses: list[float] = []
        self.started_at = time.time()

    # ----------------------------------------------------------------------------------------- events
    def emit(self, kind: str, **kw: Any) -> None:
        if self.dist.main:  # one process reports (and writes) for a multi-process run
            self.callbacks.on_event(ProgressEvent(kind=kind, **kw))  # type: ignore[arg-type]

    def should_stop(self) -> bool:
        """The callback's answer (the main process's, shared with the others)."""
        stop = self.callbacks.should_stop() if self.dist.main else False
        if self.dist.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([float(stop)], device=self._comm_device())
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def sync_gradients(self, loss_sum: float) -> float:
        """Sum gradients (and the micro-batch losses) over processes; every process then takes the same step."""
        if self.dist.world <= 1:
            return loss_sum
        import torch.distributed as dist

        assert self.optimizer is not None
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        t = torch.tensor([loss_sum], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def _say(self, message: str) -> None:
        log.info(message)
        self.emit("log", message=message)

    # ----------------------------------------------------------------------------------------- setup
    def setup_models(self) -> None:
        from .models import load_base

        cfg = self.cfg
        self.models = m = load_base(cfg.model, device=self.device, dtype=torch.float32, config_dir=cfg.model.config_dir)
        self._say(f"base: {m.family} ({m.prediction}-prediction) from {cfg.model.base}")
        for w in getattr(m, "warnings", []) or []:
            self._say(f"warning: {w}")
        m.vae.requires_grad_(False)
        m.vae.eval()
        m.unet.requires_grad_(False)
        for te in m.text_encoders:
            te.requires_grad_(False)
            te.eval()
        roles = _te_roles(m.family, len(m.text_encoders))
        self.te_components = list(zip(roles, m.text_encoders)) if self.train_te else []
        if self.native:
            m.unet.requires_grad_(True)
            for _, te in self.te_components:
                te.requires_grad_(True)
            n_params = sum(p.numel() for p in m.unet.parameters()) + sum(
                p.numel() for _, te in self.te_components for p in te.parameters())
            self._say(f"native fine-tuning: {n_params:,} trainable parameters")
        else:
            import lyco_core

            net = cfg.network
            components: dict[str, nn.Module] = {"unet": m.unet}
            components.update(dict(self.te_components))
            options = dict(net.options)
            if net.conv_dim is not None:
                options["conv_dim"] = net.conv_dim
            if net.conv_alpha is not None:
                options["conv_alpha"] = net.conv_alpha
            self.network = lyco_core.create_network(
                components, algo=net.algo, preset=net.preset, dim=net.dim, alpha=net.alpha, **options
            )
            self.network.to(self.device)
            self.network.apply()
            self.network.train()
            n_params = sum(p.numel() for p in self.network.trainable_parameters())
            algos = ", ".join(f"{k}: {v}" for k, v in self.network.summary().items())
            self._say(f"network: {len(self.network)} modules ({algos}), {n_params:,} trainable parameters")
        m.unet.train()
        for _, te in self.te_components:
            te.train()
        if cfg.train.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            for _, te in self.te_components:
                if hasattr(te, "gradient_checkpointing_enable"):
                    te.gradient_checkpointing_enable()
        if self.amp_dtype is not None:
            # frozen weights in the compute dtype (as diffusers' LoRA recipe does); trained tensors stay fp32
            if not self.native:
                m.unet.to(self.amp_dtype)
                for te in m.text_encoders:
                    te.to(self.amp_dtype)
            else:
                for te in m.text_encoders:
                    if not self.train_te:
                        te.to(self.amp_dtype)
            if self.amp_dtype == torch.bfloat16:
                m.vae.to(self.amp_dtype)

    def param_groups(self) -> list[dict[str, Any]]:
        t = self.cfg.train
        unet: list[nn.Parameter] = []
        te: list[nn.Parameter] = []
        if self.native:
            unet = [p for p in self.models.unet.parameters() if p.requires_grad]
            te = [p for _, c in self.te_components for p in c.parameters() if p.requires_grad]
        else:
            for mod in self.network:
                params = [p for p in mod.parameters() if p.requires_grad]
                (unet if mod.key.startswith("lora_unet") else te).extend(params)
        groups = [{"name": "unet", "params": unet, "lr": t.unet_lr}]
        if te:
            groups.append({"name": "text_encoder", "params": te, "lr": t.text_encoder_lr})
        return [g for g in groups if g["params"]]

    def setup_optim(self, total_steps: int) -> None:
        from .optim import make_optimizer
        from .schedule import make_scheduler

        self.optimizer = make_optimizer(self.cfg.optimizer, self.param_groups())
        self.scheduler = make_scheduler(self.cfg.scheduler, self.optimizer, total_steps)
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a state must hold to continue training (float32, as trained)."""
        if not self.native:
            return {k: v.detach() for k, v in self.network.state_dict().items()}
        out = {f"unet.{k}": v.detach() for k, v in self.models.unet.state_dict().items()}
        for role, te in self.te_components:
            out.update({f"{role}.{k}": v.detach() for k, v in te.state_dict().items()})
        return out

    def load_trainable(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        mine = self.trainable_state()
        if set(mine) != set(tensors):
            missing = sorted(set(mine) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(mine))[:3]
            raise InvalidConfigError(
                f"--resume {where}: the state's tensors do not fit this network (missing {missing}, extra {extra}); "
                "resume with the same config"
            )
        with torch.no_grad():
            for k, v in mine.items():
                if v.shape != tensors[k].shape:
                    raise InvalidConfigError(f"--resume {where}: {k} has shape {tuple(tensors[k].shape)}, "
                                             f"this network {tuple(v.shape)}")
                v.copy_(tensors[k].to(v.device, v.dtype))

    def fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "algo": c.network.algo, "preset": c.network.preset, "dim": c.network.dim, "alpha": c.network.alpha,
            "train_text_encoder": c.network.train_text_encoder, "batch_size": c.train.batch_size,
            "gradient_accumulation": c.train.gradient_accumulation, "seed": c.train.seed,
            "images": len(self.dataset.items),
        }

    # ----------------------------------------------------------------------------------------- caches
    def setup_caches(self) -> None:
        from .data import assign_bucket, buckets_for, captions_are_fixed, full_caption, load_image
        from .models import LatentCache, TextCache

        cfg = self.cfg
        if cfg.data.cache_text and not self.train_te:
            self.text_cache = TextCache(self.models)
            if captions_are_fixed(cfg.data):  # every caption is known now: encode them all before the loop
                self.text_cache.get(list(dict.fromkeys(full_caption(it, cfg.data) for it in self.dataset.items)))
        folder = Path(cfg.output.dir) / "cache" / "latents" if cfg.data.cache_latents == "disk" else None
        self.latent_cache = LatentCache(self.models.vae, cfg.data.cache_latents, folder)
        if cfg.data.cache_latents == "none":
            return
        from lyco_core.progress import progress

        buckets = buckets_for(cfg.data)
        todo = [(it, assign_bucket(it.size, buckets)) for it in self.dataset.items]
        with torch.no_grad():
            for it, bucket in progress(todo, len(todo), "cache latents", "img"):
                self.latent_cache.get(it.path, bucket, _pixels(load_image, it, bucket))

    def latents(self, batch: Any) -> torch.Tensor:
        from .data import load_image

        with torch.no_grad():
            lat = [self.latent_cache.get(it.path, batch.bucket, _pixels(load_image, it, batch.bucket))
                   for it in batch.items]
        return torch.stack([x.to(self.device, torch.float32) for x in lat])

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden (B, 77, D), pooled (B, P) | None); cached per caption while the text encoders are frozen."""
        from .models import encode_text

        if self.text_cache is not None:
            tc = self.text_cache.get(captions)
        elif self.train_te:
            with self.autocast():
                tc = encode_text(self.models, captions)
        else:
            with torch.no_grad(), self.autocast():
                tc = encode_text(self.models, captions)
        pooled = None if tc.pooled is None else tc.pooled.to(self.device)
        return tc.hidden.to(self.device), pooled

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    # ----------------------------------------------------------------------------------------- one micro-batch
    def time_ids(self, batch: Any) -> torch.Tensor:
        """SDXL size conditioning per item: original size, crop of the center crop, target size (h, w order)."""
        from .data import crop_box
        from .models import sdxl_time_ids

        bw, bh = batch.bucket
        rows = []
        for it in batch.items:
            w, h = it.size
            crop = crop_box(it.size, batch.bucket)
            rows.append(sdxl_time_ids((h, w), (crop.top, crop.left), (bh, bw)).reshape(-1))
        return torch.stack(rows).to(self.device)

    def micro_step(self, batch: Any, epoch: int, index: int, scale: float) -> float:
        """Forward + backward of one batch; the loss is divided by ``scale`` (accumulation). Returns the loss."""
        from . import noise as nz
        from .data import caption_for

        cfg, m = self.cfg, self.models
        seed = _derived_seed(cfg.train.seed, epoch, index)
        rng = random.Random(seed)
        captions = [caption_for(it, cfg.data, rng) for it in batch.items]
        latents = self.latents(batch)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        noise = nz.sample_noise(latents, cfg.train.noise_offset, gen)
        timesteps = nz.sample_timesteps(latents.shape[0], m.scheduler, gen, self.device)
        noisy = nz.add_noise(m.scheduler, latents, noise, timesteps)
        target = nz.training_target(m.scheduler, latents, noise, timesteps, m.prediction)
        hidden, pooled = self.text(captions)
        added = None
        if m.family == "sdxl":
            added = {"text_embeds": pooled, "time_ids": self.time_ids(batch)}
        with self.autocast():
            pred = m.unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        weights = nz.loss_weights(m.scheduler, timesteps, cfg.train.min_snr_gamma, m.prediction)
        loss = nz.weighted_mse(pred, target, weights)
        scaled = loss / scale
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        return float(loss.detach())

    def optimizer_step(self) -> None:
        assert self.optimizer is not None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def current_lr(self) -> float:
        from .optim import current_lrs

        assert self.optimizer is not None
        return current_lrs(self.optimizer)[0]

    # ----------------------------------------------------------------------------------------- outputs
    def facts(self, step: int, epoch: int) -> RunFacts:
        assert self.plan is not None
        assert self.optimizer is not None
        return RunFacts(step=step, epoch=epoch, total_steps=self.plan.total_steps,
                        num_train_images=self.plan.samples_per_epoch, started_at=self.started_at,
                        optimizer=optimizer_label(self.optimizer, self.cfg))

    def save(self, path: Path, step: int, epoch: int, *, final: bool) -> Path:
        if not self.dist.main:
            return path
        meta = build_metadata(self.cfg, self.dataset, self.models, self.facts(step, epoch), final=final)
        if self.native:
            out = save_native(self.models, path, self.cfg, meta)
        else:
            out = save_adapter(self.network, path, self.cfg, meta, self.models.family)
        self.emit("save", step=step, total_steps=self.plan.total_steps if self.plan else 0, epoch=epoch,
                  path=out, message=f"saved {out}")
        return out

    def sample(self, step: int, epoch: int) -> list[Path]:
        if not self.cfg.sample.prompts or not self.dist.main:
            return []
        try:
            from .sampling import sample_images
        except ImportError:
            self._say("sampling is not available in this install; skipping samples")
            return []
        out_dir = Path(self.cfg.output.dir) / "samples"
        paths: list[Path] = sample_images(self.models, self.network, self.cfg.sample.prompts, self.cfg.sample,
                                          out_dir, step, size=self.cfg.data.resolution)
        self.emit("sample", step=step, epoch=epoch, path=out_dir,
                  message=f"samples at step {step}: {paths[-1] if paths else out_dir}")
        return paths

    def write_state(self, step: int, epoch: int, batch: int) -> Path:
        assert self.optimizer is not None
        if not self.dist.main:
            return st.state_dir(self.cfg.output.dir, step)
        info = st.TrainingState(step=step, epoch=epoch, batch=batch, losses=list(self.losses),
                                fingerprint=self.fingerprint())
        path = st.save_state(self.cfg.output.dir, info, self.trainable_state(), self.optimizer, self.scheduler,
                             self.scaler, keep=self.cfg.output.keep_states)
        self.emit("state", step=step, epoch=epoch, path=path, message=f"resumable state {path}")
        return path

    # ----------------------------------------------------------------------------------------- run
    def run(self, resume: bool | str | Path = False) -> TrainResult:
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        try:
            self.dataset, self.plan = plan_run(cfg, self.dist.world)
            resume_path = st.resolve_resume(resume, Path(cfg.output.dir))
            _check_outputs(cfg, resume_path is not None, self.overwrite, delete=self.dist.main)
            Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
            tb = None
            if cfg.output.tensorboard and self.dist.main:
                tb = tensorboard_callback(Path(cfg.output.dir) / "tensorboard")
            self.callbacks = CallbackList([self.user_callback, tb])
            try:
                return self._run(resume_path)
            finally:
                if tb is not None:
                    tb.close()
        finally:
            if self.dist.started:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _run(self, resume_path: Path | None) -> TrainResult:
        cfg, plan = self.cfg, self.plan
        assert plan is not None
        total = plan.total_steps
        for line in plan.lines():
            self._say(line)
        self.setup_models()
        self.setup_optim(total)
        self.setup_caches()
        result = TrainResult(output_dir=Path(cfg.output.dir), steps=0, total_steps=total, epochs=0,
                             network=self.network, resumed_from=resume_path)
        step, start_epoch, start_batch = 0, 0, 0
        if resume_path is not None:
            saved = st.load_state(resume_path)
            st.check_fingerprint(saved.info.fingerprint, self.fingerprint(), resume_path)
            self.load_trainable(saved.trainable, resume_path)
            assert self.optimizer is not None
            self.optimizer.load_state_dict(saved.optimizer)
            self.scheduler.load_state_dict(saved.scheduler)
            if self.scaler is not None and saved.scaler is not None:
                self.scaler.load_state_dict(saved.scaler)
            st.restore_rng(saved.rng)
            step, start_epoch, start_batch = saved.info.step, saved.info.epoch, saved.info.batch
            self.losses = list(saved.info.losses)
            self._say(f"resumed from {resume_path} at step {step} (epoch {start_epoch + 1}, batch {start_batch})")
        world, rank = self.dist.world, self.dist.rank
        per_step = cfg.train.gradient_accumulation * world
        self.emit("start", step=step, total_steps=total, epoch=start_epoch, total_epochs=cfg.train.epochs,
                  message=f"training {total} steps on {self.device}")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0, step0 = time.monotonic(), step
        window: deque[float] = deque(maxlen=50)
        window.extend(self.losses[-50:])
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        epoch = start_epoch
        for epoch in range(start_epoch, cfg.train.epochs):
            if step >= total:
                break
            from .data import plan_epoch

            batches = plan_epoch(self.dataset, cfg.data, cfg.train.batch_size, cfg.train.seed, epoch)
            bi = start_batch if epoch == start_epoch else 0
            while bi < len(batches) and step < total:
                chunk = batches[bi : bi + per_step]
                # process r takes micro-batches r, r + world, …; gradients are summed over all of them
                loss_sum = sum(self.micro_step(b, epoch, bi + j, len(chunk))
                               for j, b in enumerate(chunk) if j % world == rank)
                loss = self.sync_gradients(loss_sum) / len(chunk)
                self.optimizer_step()
                step += 1
                bi += len(chunk)
                self.losses.append(loss)
                window.append(loss)
                elapsed = time.monotonic() - t0
                rate = (step - step0) / elapsed if elapsed > 0 else None
                self.emit("step", step=step, total_steps=total, epoch=epoch + 1, total_epochs=cfg.train.epochs,
                          loss=loss, avg_loss=sum(window) / len(window), lr=self.current_lr(), it_per_s=rate,
                          eta_s=(total - step) / rate if rate else None, peak_memory_mb=peak_memory_mb(self.device))
                if cfg.output.save_every_steps and step % cfg.output.save_every_steps == 0 and step < total:
                    result.saved.append(self.save(adapter_path(cfg, step=step), step, epoch, final=False))
                if self.should_stop():
                    result.state_path = self.write_state(step, epoch, bi)
                    result.cancelled = True
                    break
                if cfg.output.state_every_steps and step % cfg.output.state_every_steps == 0:
                    result.state_path = self.write_state(step, epoch, bi)
            if result.cancelled:
                break
            if bi >= len(batches):  # the epoch is complete
                done = epoch + 1
                result.epochs = done
                self.emit("epoch", step=step, total_steps=total, epoch=done, total_epochs=cfg.train.epochs,
                          avg_loss=sum(window) / len(window) if window else None,
                          message=f"epoch {done}/{cfg.train.epochs} done")
                last = done == cfg.train.epochs or step >= total
                if cfg.output.save_every_epochs and done % cfg.output.save_every_epochs == 0 and not last:
                    result.saved.append(self.save(adapter_path(cfg, epoch=done), step, done, final=False))
                if cfg.sample.every_epochs and done % cfg.sample.every_epochs == 0:
                    result.samples += self.sample(step, done)
        result.steps = step
        result.losses = list(self.losses)
        if result.cancelled:
            self._say(f"cancelled at step {step}/{total}; resume with --resume ({result.state_path})")
        else:
            result.final_path = self.save(adapter_path(cfg), step, result.epochs, final=True)
            result.saved.append(result.final_path)
        self.emit("end", step=step, total_steps=total, epoch=result.epochs, total_epochs=cfg.train.epochs,
                  loss=result.final_loss, peak_memory_mb=peak_memory_mb(self.device), path=result.final_path,
                  message="cancelled" if result.cancelled else f"done: {result.final_path}")
        return result


def _pixels(load_image: Callable[[Any, tuple[int, int]], torch.Tensor], item: Any,
            bucket: tuple[int, int]) -> Callable[[], torch.Tensor]:
    return lambda: load_image(item, bucket)


def train(
    cfg: TrainConfig,
    *,
    callback: Any = None,
    resume: bool | str | Path = False,
    overwrite: bool = False,
) -> TrainResult:
    """Run training as ``cfg`` says (see the module doc); ``callback`` gets :class:`ProgressEvent` objects and may
    cancel; ``resume`` is False, True (the newest complete state in ``output.dir``) or a state folder;
    ``overwrite`` replaces an earlier run's outputs in ``output.dir`` (else that is an error)."""
    return Trainer(cfg, callback, overwrite=overwrite).run(resume)


__all__ = ["DTYPES", "TrainPlan", "TrainResult", "Trainer", "plan_run", "seed_everything", "train"]
