#!/usr/bin/env python
"""Training benchmark: Lyco's training step (``lyco train``) vs the diffusers + PEFT LoRA recipe, on CPU.

The reference is the loop of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``, written out here
(:class:`Recipe`): ``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian",
target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``; every step loads the batch's images (resize + center
crop + normalise, as its ``train_transforms``; ``dataloader_num_workers`` 0, its default), tokenises the
captions, encodes the images with the VAE (``latent_dist.sample() * scaling_factor``), draws DDPM noise and
uniform timesteps, runs the text encoder, the UNet, an MSE loss on the epsilon target, backward,
``clip_grad_norm_(…, 1.0)``, AdamW (lr 1e-4, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8), a constant
schedule, ``zero_grad``. (The script runs this through ``accelerate``, which on one CPU process adds nothing.)

Lyco's step is what ``lyco_trainer.loop`` does per optimiser step (``Trainer.micro_step`` + ``optimizer_step``):
the VAE latents and the text-encoder outputs are computed once and cached (the text encoder is frozen), so a
step is noise + UNet forward/backward + clip + AdamW. Not encoding every step is the main reason Lyco's step is
cheaper, and it is what ``lyco train`` really does (``data.cache_latents = "memory"``, ``data.cache_text = true``
are its defaults); the bench reports it rather than hiding it, and also times a Lyco step *with* the VAE
encoding and text encoder forward added back (``lyco-encode``), i.e. the adapter implementation alone.

Same for both: the pipeline folder, images and captions, LoRA rank and alpha (= rank), the modules (every
attention ``to_q``/``to_k``/``to_v``/``to_out.0`` of the UNet: Lyco's built-in preset ``attn-only``; checked
by comparing the sorted module paths), batch size, resolution, optimiser settings, max-norm 1.0, fp32, seed.

Model: an SD 1.5 pipeline at 1/4 width, random weights, saved as a diffusers folder (both sides load it
with ``from_pretrained``): UNet with SD 1.5's config but ``block_out_channels`` (80, 160, 320, 320),
``norm_num_groups`` 16 and ``cross_attention_dim`` 192; VAE with SD's config but ``block_out_channels`` (32, 64,
128, 128); CLIP text encoder with CLIP ViT-L/14's 12 layers at hidden 192 (3 heads of 64, MLP 768, 77
positions); the tiny pipeline's BPE tokenizer; SD 1.5's noise schedule. Images: 256 × 256 px (32 × 32
latents), synthetic shapes with captions, two concept folders.

Measurements. Time: both steppers are built in ONE process and run alternately, one step each, the order
rotating every round (the development machines are shared; interleaving exposes both to the same drift); the
minimum (and median) over ``--steps`` timed steps after ``--warmup`` is reported. Memory: each contender also runs
on its own in a fresh child process — Lyco as the real ``lyco_trainer.loop.train`` (its per-step time from the
``step`` progress events is shown as ``loop s/step``, a cross-check), the recipe as its loop — and ``peak MB`` =
peak RSS (psutil, sampled every 2 ms) minus the RSS after imports, i.e. models + adapter + caches + optimiser
state + activations; ``step MB`` = peak RSS minus the RSS just before the first step.

Usage::

    .venv/bin/python bench/train.py                           # setup (once, in --workdir) + table
    .venv/bin/python bench/train.py --rank 8 --batch 2 --json out.json
    .venv/bin/python bench/train.py --only lyco               # one memory child, in this process
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import paths_digest

SEED = 1234
MB = 1024 * 1024
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
CONTENDERS = ("lyco", "recipe")
TIME_TARGET = 0.8  # Lyco's step time / the recipe's
LR = 1e-4
MAX_GRAD_NORM = 1.0
CONCEPTS = (("circle", (220, 30, 30)), ("square", (30, 60, 220)))


# ---------------------------------------------------------------------------------------------------- setup
def unet_config() -> dict[str, Any]:
    """SD 1.5's UNet config at 1/4 width (cross-attention 768 / 4 = 192, matching the text encoder)."""
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [80, 160, 320, 320],
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 192,
        "norm_num_groups": 16,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_scale_factor": 1,
    }


def vae_config() -> dict[str, Any]:
    """SD's VAE config at 1/4 width (128/256/512/512 → 32/64/128/128; still ×8 downsampling)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 64, 128, 128],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 0.18215,
    }


def write_pipeline(folder: Path) -> Path:
    """The 1/4-width SD 1.5 pipeline as a diffusers folder (random weights, seeded)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lyco_trainer.models.tiny import write_tokenizer_files

    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    tok_dir = write_tokenizer_files(tmp / "tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**unet_config())
    vae = AutoencoderKL(**vae_config())
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=192, intermediate_size=768, num_hidden_layers=12,
            num_attention_heads=3, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=192,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    sched = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp / "pipe"), safe_serialization=True)
    write_tokenizer_files(tmp / "pipe" / "tokenizer", configs=False)
    os.replace(tmp / "pipe", folder)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_images(root: Path, n: int, size: int) -> list[tuple[Path, str]]:
    """``n`` images per concept folder (``root/<concept>/``), ``size`` px squares with a caption file each."""
    from PIL import Image, ImageDraw

    rng = random.Random(SEED)
    out: list[tuple[Path, str]] = []
    for name, colour in CONCEPTS:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = d / f"{name}_{i:02d}.png"
            cap = f"{name}, {'red' if colour[0] > 100 else 'blue'}, white background"
            if not p.is_file():
                im = Image.new("RGB", (size, size), (245, 245, 240))
                r = rng.uniform(0.2, 0.35) * size
                cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
                box = (cx - r, cy - r, cx + r, cy + r)
                draw = ImageDraw.Draw(im)
                (draw.ellipse if name == "circle" else draw.rectangle)(box, fill=colour)
                im.save(p)
                p.with_suffix(".txt").write_text(cap + "\n")
            out.append((p, cap))
    return out


def setup(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    base = write_pipeline(workdir / "base")
    data = workdir / f"data-{args.resolution}"
    write_images(data, args.images, args.resolution)
    return base, data


# ---------------------------------------------------------------------------------------------------- Lyco
def lyco_config(base: Path, data: Path, out: Path, args: argparse.Namespace, steps: int) -> Any:
    from lyco_trainer.config import parse_config

    return parse_config(
        {
            "model": {"base": str(base)},
            "network": {"algo": "lora", "preset": "attn-only", "dim": args.rank, "alpha": float(args.rank)},
            "data": {"root": str(data), "resolution": args.resolution, "buckets": False, "balance": True,
                     "cache_latents": "memory", "cache_text": True},
            "train": {"batch_size": args.batch, "epochs": 1000, "max_steps": steps, "unet_lr": LR,
                      "max_grad_norm": MAX_GRAD_NORM, "seed": SEED, "device": "cpu", "mixed_precision": "no"},
            "optimizer": {"name": "adamw", "weight_decay": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8},
            "scheduler": {"name": "constant"},
            "output": {"dir": str(out), "name": "bench", "save_every_epochs": None, "tensorboard": False},
            "sample": {"prompts": []},
        },
        "bench",
    )


class LycoStepper:
    """Lyco's optimiser step exactly as ``Trainer._run`` does it (``micro_step`` + ``optimizer_step``), set up
    by the Trainer's own methods (load, network, optimiser, latent cache)."""

    def __init__(self, cfg: Any, encode_each_step: bool = False) -> None:
        from lyco_trainer.data import plan_epoch
        from lyco_trainer.loop import Trainer, plan_run, seed_everything

        self.plan_epoch = plan_epoch
        self.cfg = cfg
        self.trainer = tr = Trainer(cfg, None, overwrite=True)
        seed_everything(cfg.train.seed)
        tr.dataset, tr.plan = plan_run(cfg)
        tr.setup_models()
        tr.setup_optim(tr.plan.total_steps)
        tr.setup_caches()
        assert tr.optimizer is not None
        tr.optimizer.zero_grad(set_to_none=True)
        self.epoch, self.index = 0, 0
        self.batches = plan_epoch(tr.dataset, cfg.data, cfg.train.batch_size, cfg.train.seed, 0)
        if encode_each_step:  # the adapter implementation alone: pay the recipe's encoders again each step
            self._wrap_encoders()

    def _wrap_encoders(self) -> None:
        from lyco_trainer.data import load_image
        from lyco_trainer.models import encode_latents, encode_text

        tr = self.trainer

        def latents(batch: Any) -> torch.Tensor:
            return torch.stack([encode_latents(tr.models.vae, load_image(it, batch.bucket), SEED)
                                for it in batch.items])

        def text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            with torch.no_grad():
                tc = encode_text(tr.models, captions)
            return tc.hidden, tc.pooled

        tr.latents = latents  # type: ignore[method-assign]
        tr.text = text  # type: ignore[method-assign]

    def __call__(self) -> float:
        tr = self.trainer
        if self.index >= len(self.batches):
            self.epoch += 1
            self.index = 0
            self.batches = self.plan_epoch(tr.dataset, self.cfg.data, self.cfg.train.batch_size,
                                           self.cfg.train.seed, self.epoch)
        loss = tr.micro_step(self.batches[self.index], self.epoch, self.index, 1)
        tr.optimizer_step()
        self.index += 1
        return loss

    def module_paths(self) -> list[str]:
        unet = self.trainer.models.unet
        where = {id(m): p for p, m in unet.named_modules()}
        return sorted(where[id(m.base)] for m in self.trainer.network)

    def params(self) -> int:
        return sum(p.numel() for p in self.trainer.network.trainable_parameters())


# ---------------------------------------------------------------------------------------------------- recipe
class Recipe:
    """diffusers' ``train_text_to_image_lora.py`` loop (epsilon prediction, no noise offset / SNR weighting)."""

    def __init__(self, base: Path, items: list[tuple[Path, str]], args: argparse.Namespace) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        torch.manual_seed(SEED)
        self.noise_scheduler = DDPMScheduler.from_pretrained(str(base), subfolder="scheduler")
        self.tokenizer = CLIPTokenizer.from_pretrained(str(base), subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        lora = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        self.unet.add_adapter(lora)
        self.lora_layers = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.lora_layers, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.unet.train()
        self.items, self.batch, self.resolution = items, args.batch, args.resolution
        self.order = list(range(len(items)))
        self.pos = len(self.order)
        self.rng = random.Random(SEED)

    def _pixels(self, path: Path) -> torch.Tensor:
        """The script's train_transforms: Resize(res, bilinear) → CenterCrop(res) → ToTensor → Normalize(0.5, 0.5)."""
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = self.resolution / min(w, h)
            im = im.resize((max(self.resolution, round(w * s)), max(self.resolution, round(h * s))),
                           Image.Resampling.BILINEAR)
            left, top = (im.width - self.resolution) // 2, (im.height - self.resolution) // 2
            im = im.crop((left, top, left + self.resolution, top + self.resolution))
            import numpy as np

            arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (arr - 0.5) / 0.5

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self.pos + self.batch > len(self.order):  # a shuffled epoch (drop_last semantics)
            self.rng.shuffle(self.order)
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        pixel_values = torch.stack([self._pixels(self.items[i][0]) for i in idx])
        input_ids = self.tokenizer([self.items[i][1] for i in idx], max_length=self.tokenizer.model_max_length,
                                   padding="max_length", truncation=True, return_tensors="pt").input_ids
        return {"pixel_values": pixel_values, "input_ids": input_ids}

    def __call__(self) -> float:
        batch = self._next_batch()
        latents = self.vae.encode(batch["pixel_values"]).latent_dist.sample()
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
        timesteps = timesteps.long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(batch["input_ids"], return_dict=False)[0]
        target = noise
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lora_layers, MAX_GRAD_NORM)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        return float(loss.detach())

    def module_paths(self) -> list[str]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return sorted(p for p, m in self.unet.named_modules() if isinstance(m, BaseTunerLayer))

    def params(self) -> int:
        return sum(p.numel() for p in self.lora_layers)


# ---------------------------------------------------------------------------------------------------- children
def proc_memory() -> tuple[int, int]:
    """(RSS, anonymous RSS) of this process in bytes (Linux ``/proc/self/status``; anon = RSS elsewhere)."""
    import psutil

    rss = psutil.Process().memory_info().rss
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return rss, int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, rss


class MemorySampler:
    """Peak RSS and peak anonymous RSS of this process, sampled every 2 ms in a daemon thread (as
    bench/train_step.py's RssSampler, plus the anonymous part: the model weights are memory-mapped files,
    whose pages RSS counts once touched; anonymous memory is everything the run allocates)."""

    def __init__(self, interval: float = 0.002) -> None:
        import threading

        self.interval = interval
        self.peak, self.peak_anon = proc_memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        rss, anon = proc_memory()
        self.peak, self.peak_anon = max(self.peak, rss), max(self.peak_anon, anon)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@dataclass
class Result:
    name: str
    status: str = "ok"
    reason: str = ""
    modules: int = 0
    params: int = 0
    paths_sha1: str = ""
    times: list[float] = field(default_factory=list)  # interleaved step times (parent)
    t_min: float = float("nan")
    t_median: float = float("nan")
    loop_times: list[float] = field(default_factory=list)  # per-step wall times in the child
    loop_median: float = float("nan")
    import_rss_mb: float = float("nan")
    peak_mb: float = float("nan")  # peak RSS − RSS after imports
    anon_mb: float = float("nan")  # peak anonymous RSS − anonymous RSS after imports
    step_mb: float = float("nan")  # peak RSS − RSS just before the first step
    maxrss_mb: float = float("nan")
    losses: list[float] = field(default_factory=list)


def _import_all() -> None:
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lyco_core  # noqa: F401
    import lyco_trainer.loop  # noqa: F401


def run_child_body(name: str, base: Path, data: Path, args: argparse.Namespace) -> Result:
    """One contender alone in this process: memory, and its own per-step times."""
    import psutil

    torch.set_num_threads(args.threads)
    res = Result(name=name)
    _import_all()
    gc.collect()
    proc = psutil.Process()
    import_rss, import_anon = proc_memory()
    res.import_rss_mb = import_rss / MB
    total = args.warmup + args.steps
    with MemorySampler() as sampler:
        if name == "lyco":
            from lyco_trainer.loop import Trainer

            stamps: list[float] = []
            first_rss: list[int] = []

            class Cb:
                def on_event(self, ev: Any) -> None:
                    if ev.kind == "start":
                        first_rss.append(proc.memory_info().rss)
                        stamps.append(time.perf_counter())
                    elif ev.kind == "step":
                        stamps.append(time.perf_counter())
                        res.losses.append(float(ev.loss))

                def should_stop(self) -> bool:
                    return False

            with tempfile.TemporaryDirectory() as tmp:
                cfg = lyco_config(base, data, Path(tmp) / "out", args, total)
                tr = Trainer(cfg, Cb(), overwrite=True)
                tr.run()
                where = {id(m): p for p, m in tr.models.unet.named_modules()}
                paths = sorted(where[id(m.base)] for m in tr.network)
                res.params = sum(p.numel() for p in tr.network.trainable_parameters())
            res.loop_times = [b - a for a, b in itertools.pairwise(stamps)]
            start_rss = first_rss[0] if first_rss else import_rss
        else:
            items = write_images(data, args.images, args.resolution)
            recipe = Recipe(base, items, args)
            paths = recipe.module_paths()
            res.params = recipe.params()
            start_rss = proc.memory_info().rss
            for _ in range(total):
                t0 = time.perf_counter()
                res.losses.append(recipe())
                res.loop_times.append(time.perf_counter() - t0)
    res.peak_mb = (sampler.peak - import_rss) / MB
    res.anon_mb = (sampler.peak_anon - import_anon) / MB
    res.step_mb = (sampler.peak - start_rss) / MB
    res.maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB - res.import_rss_mb
    timed = res.loop_times[args.warmup :]
    res.loop_median = sorted(timed)[len(timed) // 2] if timed else float("nan")
    res.modules, res.paths_sha1 = len(paths), paths_digest(paths)
    return res


def run_child(name: str, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--result", out, *args.passthrough]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            return Result(name=name, status="error", reason=f"timeout {args.child_timeout}s")
        if os.path.exists(out):
            with open(out) as f:
                return Result(**json.load(f))
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return Result(name=name, status="error", reason=tail[0][:300])


def interleaved(base: Path, data: Path, args: argparse.Namespace, names: list[str]) -> dict[str, list[float]]:
    """Both steppers in this process, one step each in turn (order rotating every round); step times."""
    torch.set_num_threads(args.threads)
    steppers: dict[str, Callable[[], float]] = {}
    total = args.warmup + args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name == "recipe":
                steppers[name] = Recipe(base, write_images(data, args.images, args.resolution), args)
            else:
                cfg = lyco_config(base, data, Path(tmp) / name, args, total)
                steppers[name] = LycoStepper(cfg, encode_each_step=name == "lyco-encode")
        for name in names:
            for _ in range(args.warmup):
                steppers[name]()
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(args.steps):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                steppers[name]()
                times[name].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------------- report
def verdict(lyco: Result, recipe: Result) -> str:
    if lyco.status != "ok" or recipe.status != "ok":
        return "-"
    misses = []
    ratio = lyco.t_min / recipe.t_min
    if ratio > TIME_TARGET:
        misses.append(f"{ratio:.2f}x>{TIME_TARGET}x time")
    if lyco.peak_mb > recipe.peak_mb:
        misses.append("more memory")
    if lyco.paths_sha1 != recipe.paths_sha1:
        misses.append("MODULE SETS DIFFER")
    return "PASS" if not misses else "MISS: " + ", ".join(misses)


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    by = {r.name: r for r in results}
    ref = by.get("recipe")
    head = ("contender", "modules", "params", "s/step min", "median", "x recipe", "loop s/step", "peak MB",
            "anon MB", "step MB", "verdict")
    rows = []
    for r in results:
        if r.status != "ok":
            rows.append((r.name, "-", "-", r.status, "-", "-", "-", "-", "-", "-", r.reason[:60]))
            continue
        ratio = r.t_min / ref.t_min if ref is not None and ref.status == "ok" else float("nan")
        target = f" (<= {TIME_TARGET})" if r.name == "lyco" else ""
        rows.append((
            r.name, str(r.modules) if r.modules else "-", f"{r.params:,}" if r.params else "-", f"{r.t_min:.3f}",
            f"{r.t_median:.3f}", f"{ratio:.2f}{target}",
            f"{r.loop_median:.3f}" if r.loop_times else "-",
            f"{r.peak_mb:,.0f}" if r.peak_mb == r.peak_mb else "-",
            f"{r.anon_mb:,.0f}" if r.anon_mb == r.anon_mb else "-",
            f"{r.step_mb:,.0f}" if r.step_mb == r.step_mb else "-",
            verdict(r, ref) if r.name == "lyco" and ref is not None else "-",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU fp32; SD 1.5 pipeline at 1/4 width, "
          f"{args.resolution} px ({args.resolution // 8}x{args.resolution // 8} latents), batch {args.batch}, "
          f"LoRA rank {args.rank} alpha {args.rank}; {args.warmup} warm-up + {args.steps} timed steps, interleaved")
    ok = [r for r in results if r.status == "ok" and r.paths_sha1]
    same = len({r.paths_sha1 for r in ok}) == 1
    print("modules: " + ", ".join(f"{r.name} {r.modules} ({r.paths_sha1})" for r in ok)
          + (" -> identical module paths" if same else " -> MODULE SETS DIFFER"))
    for r in results:
        if r.losses:
            print(f"  {r.name}: losses of the memory run {', '.join(f'{x:.3f}' for x in r.losses[:6])}"
                  f"{' ...' if len(r.losses) > 6 else ''}")


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lyco-bench-train"),
                    help="pipeline folder and images (made once, reused)")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank), the recipe's default 4")
    ap.add_argument("--batch", type=int, default=1, help="batch size (the recipe's default is 16; 1 on CPU)")
    ap.add_argument("--resolution", type=int, default=256, help="image side in px (multiple of 64)")
    ap.add_argument("--images", type=int, default=4, help="images per concept folder (2 folders)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per contender")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--rounds", type=int, default=2, help="memory child runs per contender (max peak is shown)")
    ap.add_argument("--no-encode-variant", action="store_true",
                    help="skip lyco-encode (Lyco's step with the VAE and text encoder run every step)")
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--only", choices=CONTENDERS, help="run one memory child in this process and print its row")
    ap.add_argument("--child-timeout", type=int, default=1800, help="seconds per child process")
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.rank < 1 or args.resolution % 64:
        ap.error("--steps ≥ 1, --warmup ≥ 0, --batch ≥ 1, --rank ≥ 1, --resolution a multiple of 64")
    args.passthrough = [
        "--workdir", args.workdir, "--rank", str(args.rank), "--batch", str(args.batch),
        "--resolution", str(args.resolution), "--images", str(args.images), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--threads", str(args.threads),
    ]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base, data = setup(Path(args.workdir), args)
    if args.only:
        try:
            res = run_child_body(args.only, base, data, args)
        except Exception as e:
            traceback.print_exc()
            res = Result(name=args.only, status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        if args.result:
            with open(args.result, "w") as f:
                json.dump(asdict(res), f)
        else:
            res.t_min = min(res.loop_times[args.warmup :] or [float("nan")])
            res.t_median = res.loop_median
            print_table([res], args)
        return 0
    results: list[Result] = []
    for name in CONTENDERS:
        results.append(Result(name=name, peak_mb=0.0, anon_mb=0.0, step_mb=0.0))
    for rnd in range(args.rounds):  # memory children, the order rotating every round; max peak over rounds
        order = list(CONTENDERS[rnd % 2 :] + CONTENDERS[: rnd % 2])
        for name in order:
            t0 = time.perf_counter()
            r = run_child(name, args)
            print(f"[{name}] memory child {rnd + 1}/{args.rounds}: {r.status} {r.reason} peak {r.peak_mb:.0f} MB "
                  f"(anon {r.anon_mb:.0f}), own median {r.loop_median:.3f} s/step — {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)
            agg = next(x for x in results if x.name == name)
            if r.status != "ok":
                agg.status, agg.reason = r.status, r.reason
                continue
            best = agg.loop_median if agg.loop_times else float("inf")
            agg.modules, agg.params, agg.paths_sha1, agg.losses = r.modules, r.params, r.paths_sha1, r.losses
            agg.import_rss_mb = r.import_rss_mb
            agg.peak_mb, agg.anon_mb = max(agg.peak_mb, r.peak_mb), max(agg.anon_mb, r.anon_mb)
            agg.step_mb, agg.maxrss_mb = max(agg.step_mb, r.step_mb), r.maxrss_mb
            if r.loop_median < best:
                agg.loop_times, agg.loop_median = r.loop_times, r.loop_median
    names = [r.name for r in results if r.status == "ok"]
    if not args.no_encode_variant and "lyco" in names:
        names.append("lyco-encode")
        results.append(Result(name="lyco-encode"))
    print(f"[interleaved] timing {', '.join(names)} ...", file=sys.stderr, flush=True)
    try:
        times = interleaved(base, data, args, names)
    except Exception as e:
        traceback.print_exc()
        times = {}
        for r in results:
            if r.name in names:
                r.status, r.reason = "error", f"interleaved: {type(e).__name__}: {e}".splitlines()[0][:300]
    for r in results:
        if r.name in times:
            r.times = times[r.name]
            r.t_min = min(r.times)
            r.t_median = sorted(r.times)[len(r.times) // 2]
    print_table(results, args)
    if args.json:
        payload = {"args": {k: v for k, v in vars(args).items() if k not in ("result", "passthrough")},
                   "torch": torch.__version__, "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
