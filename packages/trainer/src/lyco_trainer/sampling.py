"""Sample images during training: the model being trained, adapter active, fixed seeds, a labelled grid.

:func:`sample_images` builds a diffusers ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL)
around the components already in memory — the UNet and text encoder(s) with the adapter network applied — with
a DDIM scheduler made from the training scheduler's config (same betas, same prediction type), no safety
checker, and one fixed seed per prompt (``cfg.seed + i``), so the samples of successive epochs differ only by
what training changed. The models are put in eval mode and sampled under ``torch.no_grad``; every module's
train/eval flag and the global torch RNG state are restored afterwards, so sampling does not change the
training run (resume equivalence holds with or without samples).

Files written in ``out_dir`` (atomically; samples of the same step are replaced):

* ``sample-<step>-<i>.png``: prompt ``i``'s image (``width`` × ``height`` pixels);
* ``samples-<step>.png``: a grid of all images, each with its prompt written under it, small images scaled up
  by an integer factor (nearest neighbour) so the captions stay readable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from lyco_core.errors import InvalidConfigError
from lyco_core.formats.safetensors_io import atomic_output

from .config import SampleConfig

#: the grid shows images at least this many pixels wide (integer nearest-neighbour upscaling)
GRID_MIN_CELL = 192
GRID_COLUMNS = 4


def sample_paths(out_dir: str | Path, step: int, count: int) -> tuple[list[Path], Path]:
    """The files :func:`sample_images` writes for ``count`` prompts at ``step``: (images, grid)."""
    out = Path(out_dir)
    return [out / f"sample-{step}-{i}.png" for i in range(count)], out / f"samples-{step}.png"


def sample_size(models: Any, cfg: SampleConfig, default: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) in pixels: the config's, else ``default`` (e.g. the training resolution), else the UNet's
    native size (``sample_size`` × the VAE's downscale factor). Rounded down to a multiple of 8 (at least 8)."""
    vae_scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
    if isinstance(default, int):
        default = (default, default)
    if default is None:
        native = models.unet.config.sample_size
        native = native if isinstance(native, int) else native[0]
        default = (native * vae_scale, native * vae_scale)
    w = cfg.width if cfg.width is not None else default[0]
    h = cfg.height if cfg.height is not None else default[1]
    return max(8, w // 8 * 8), max(8, h // 8 * 8)


@contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each one's own ``training`` flag restored after."""
    flags: dict[int, tuple[nn.Module, bool]] = {}
    for top in modules:
        for m in top.modules():
            flags.setdefault(id(m), (m, m.training))
    try:
        for top in modules:
            top.eval()
        yield
    finally:
        for m, was in flags.values():
            m.training = was


@contextmanager
def _keep_rng(device: torch.device) -> Iterator[None]:
    """Restore the global torch RNG state (CPU, and the CUDA device in use) after the block."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        yield


def _scheduler(models: Any) -> Any:
    from diffusers import DDIMScheduler

    overrides: dict[str, Any] = {
        # As SD's released sampler configs: latents are not in [-1, 1] (no clipping), the last timestep is 1.
        # A DDPMScheduler made with defaults (a tiny pipeline's) has clip_sample=True and steps_offset=0.
        "clip_sample": False,
        "steps_offset": 1,
        "set_alpha_to_one": False,
    }
    prediction = getattr(models, "prediction", None)
    if prediction in ("epsilon", "v"):
        overrides["prediction_type"] = "v_prediction" if prediction == "v" else "epsilon"
    # keyword overrides: values in the config dict that were defaults (``_use_default_values``) would be ignored
    return DDIMScheduler.from_config(models.scheduler.config, **overrides)


def build_pipeline(models: Any) -> Any:
    """A diffusers pipeline on the in-memory components (nothing copied; no safety checker, no progress bar)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = _scheduler(models)
    tes, toks = list(models.text_encoders), list(models.tokenizers)
    pipe: Any
    if models.family == "sdxl":
        if len(tes) != 2 or len(toks) != 2:
            raise InvalidConfigError(f"sample: SDXL needs 2 text encoders and 2 tokenizers, got {len(tes)}/{len(toks)}")
        pipe = StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=tes[0],
            text_encoder_2=tes[1],
            tokenizer=toks[0],
            tokenizer_2=toks[1],
            unet=models.unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        if len(tes) != 1 or len(toks) != 1:
            raise InvalidConfigError(
                f"sample: SD 1.x/2.x needs 1 text encoder and 1 tokenizer, got {len(tes)}/{len(toks)}"
            )
        pipe = StableDiffusionPipeline(
            vae=models.vae,
            text_encoder=tes[0],
            tokenizer=toks[0],
            unet=models.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _decode(models: Any, latents: torch.Tensor) -> list[Image.Image]:
    """VAE-decode pipeline latents (B, 4, h, w) to PIL images, in the VAE's own dtype (it may differ from the
    UNet's when the UNet trains in half precision)."""
    vae = models.vae
    lat = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        m = torch.tensor(mean, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1)
        lat = lat * s / vae.config.scaling_factor + m
    else:
        lat = lat / vae.config.scaling_factor
    pixels = vae.decode(lat, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def generate(
    models: Any, prompts: Sequence[str], cfg: SampleConfig, size: tuple[int, int]
) -> list[Image.Image]:
    """One image per prompt (seed ``cfg.seed + i``), in eval mode, without gradients; state restored after."""
    unet = models.unet
    device = next(unet.parameters()).device
    pipe = build_pipeline(models)
    width, height = size
    images: list[Image.Image] = []
    # frozen weights in half precision (mixed-precision training) with float32 adapter tensors: sample as the
    # training forward runs, under autocast
    half = device.type == "cuda" and unet.dtype in (torch.float16, torch.bfloat16)
    amp = torch.autocast("cuda", dtype=unet.dtype) if half else contextlib.nullcontext()
    with _eval_mode([unet, models.vae, *models.text_encoders]), _keep_rng(device), torch.no_grad(), amp:
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed + i)
            latents = pipe(
                prompt=prompt,
                width=width,
                height=height,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance,
                generator=gen,
                output_type="latent",
                return_dict=False,
            )[0]
            images.extend(_decode(models, latents))
    return images


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels (very long words are cut by characters)."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if font.getlength(cand) <= width:
                line = cand
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = max(1, int(len(word) * width / max(1.0, font.getlength(word))))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def make_grid(images: Sequence[Image.Image], captions: Sequence[str], title: str = "") -> Image.Image:
    """Images in rows of up to :data:`GRID_COLUMNS`, each with its caption (word-wrapped) under it."""
    if not images:
        raise InvalidConfigError("sample: no images to put in a grid")
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    scale = max(1, math.ceil(GRID_MIN_CELL / w))
    cw, ch = w * scale, h * scale
    pad, font = 8, _font(13)
    line_h = int(font.getbbox("Ag")[3]) + 3
    wrapped = [_wrap(c, font, cw) for c in captions]
    text_h = line_h * max(len(x) for x in wrapped)
    cols = min(GRID_COLUMNS, len(images))
    rows = math.ceil(len(images) / cols)
    head = line_h + pad if title else 0
    grid = Image.new("RGB", (pad + cols * (cw + pad), head + pad + rows * (ch + text_h + 2 * pad)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad // 2), title, fill="black", font=font)
    for i, (im, lines) in enumerate(zip(images, wrapped)):
        r, c = divmod(i, cols)
        x = pad + c * (cw + pad)
        y = head + pad + r * (ch + text_h + 2 * pad)
        grid.paste(im.convert("RGB").resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x, y + ch + pad // 2 + k * line_h), line, fill="black", font=font)
    return grid


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        image.save(tmp, format="PNG")


def sample_images(
    models: Any,
    network: nn.Module | None,
    prompts: Sequence[str],
    cfg: SampleConfig,
    out_dir: str | Path,
    step: int,
    *,
    size: int | tuple[int, int] | None = None,
) -> list[Path]:
    """Generate one image per prompt with the adapter active; write them and a labelled grid.

    ``models`` is a :class:`lyco_trainer.models.BaseModels` (``unet``, ``vae``, ``text_encoders``,
    ``tokenizers``, ``scheduler``, ``family``, ``prediction``); ``network`` is the adapter network, already
    applied to the UNet/text encoder(s) (it is not changed; passed so its modules' train flags are restored
    too). ``size`` is the default (width, height) — or one int for a square — when ``cfg.width``/``cfg.height``
    are unset (the loop passes the training resolution). Returns the image paths ``sample-<step>-<i>.png``
    followed by the grid ``samples-<step>.png`` (last); an empty list when there are no prompts.
    """
    if not prompts:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wh = sample_size(models, cfg, size)
    extra = [network] if network is not None else []
    with _eval_mode(extra):
        images = generate(models, prompts, cfg, wh)
    paths, grid_path = sample_paths(out, step, len(prompts))
    for im, p in zip(images, paths):
        _save_png(im, p)
    title = f"step {step} · seed {cfg.seed}+i · {cfg.steps} DDIM steps · guidance {cfg.guidance:g} · {wh[0]}x{wh[1]}"
    _save_png(make_grid(images, list(prompts), title), grid_path)
    return [*paths, grid_path]
