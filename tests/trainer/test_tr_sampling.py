"""Sample images: files and sizes, determinism per seed, the adapter's effect, train flags and RNG restored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

import lyco_core as lc
from lyco_trainer.config import SampleConfig
from lyco_trainer.models import build_tiny_pipeline
from lyco_trainer.sampling import make_grid, sample_images


# ------------------------------------------------------------------------------------------ tiny stand-ins
@dataclass
class Models:
    """The fields of lyco_trainer.models.BaseModels that sampling reads."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler: Any
    family: str
    prediction: str = "epsilon"


def tiny_models(tmp: Path, family: str = "sd1") -> Models:
    """T2's tiny pipeline (real diffusers/transformers modules) + a DDPM training scheduler, frozen."""
    pipe = build_tiny_pipeline(family, seed=0, tokenizer_dir=tmp / "tokenizer")  # type: ignore[arg-type]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    for m in (pipe.unet, pipe.vae, *tes):
        m.requires_grad_(False)
    return Models(pipe.unet, pipe.vae, tes, toks, sched, family)


def _network(models: Models) -> lc.AdapterNetwork:
    torch.manual_seed(1)
    net = lc.create_network(models.unet, algo="lokr", preset="attn-only", dim=4, alpha=4, factor=4)
    with torch.no_grad():  # a trained-like adapter: LoKr's w2 starts at zero, so give it values
        for p in net.trainable_parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    net.apply()
    net.train()
    return net


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


CFG = SampleConfig(prompts=[], steps=3, guidance=2.0, width=48, height=32, seed=7)
PROMPTS = ["a red circle", "a blue square"]


# ------------------------------------------------------------------------------------------ tests
def test_files_sizes_and_grid(tmp_path: Path) -> None:
    models = tiny_models(tmp_path)
    net = _network(models)
    paths = sample_images(models, net, PROMPTS, CFG, tmp_path / "s", step=12)
    assert [p.name for p in paths] == ["sample-12-0.png", "sample-12-1.png", "samples-12.png"]
    for p in paths[:2]:
        with Image.open(p) as im:
            assert im.format == "PNG"
            assert im.size == (48, 32)
    with Image.open(paths[2]) as grid:
        # two cells upscaled ×4 (48 px → 192 px) side by side, plus a caption band
        assert grid.width >= 2 * 192
        assert grid.height > 32 * 4
    # the grid holds the images themselves (nearest-neighbour ×4): image 1 is the second cell, right of the
    # 8 px margin, the 192 px first cell and an 8 px gap, under the title line
    g = _pixels(paths[2])
    up = np.kron(_pixels(paths[1]), np.ones((4, 4, 1), dtype=np.int16))
    x = 8 + 192 + 8
    rows = [y for y in range(60) if np.array_equal(g[y : y + up.shape[0], x : x + up.shape[1]], up)]
    assert len(rows) == 1
    assert not list((tmp_path / "s").glob(".*tmp"))  # atomic writes leave no temporaries


def test_same_seed_same_pixels_and_seed_matters(tmp_path: Path) -> None:
    models = tiny_models(tmp_path)
    net = _network(models)
    a = sample_images(models, net, PROMPTS, CFG, tmp_path / "a", step=1)
    b = sample_images(models, net, PROMPTS, CFG, tmp_path / "b", step=1)
    for pa, pb in zip(a, b):
        assert np.array_equal(_pixels(pa), _pixels(pb))
    c = sample_images(models, net, PROMPTS[:1], CFG.model_copy(update={"seed": 8}), tmp_path / "c", step=1)
    assert np.abs(_pixels(c[0]) - _pixels(a[0])).max() > 0
    # prompt i uses seed + i: prompt 1 at seed 7 is prompt 0's noise at seed 8 → different prompt, same noise.
    # With the same prompt text both ways the pixels must match exactly.
    d = sample_images(models, net, ["x", "a red circle"], CFG.model_copy(update={"seed": 6}), tmp_path / "d", step=1)
    assert np.array_equal(_pixels(d[1]), _pixels(a[0]))


def test_adapter_changes_image_and_restore_matches_base(tmp_path: Path) -> None:
    models = tiny_models(tmp_path)
    base = sample_images(models, None, PROMPTS[:1], CFG, tmp_path / "base", step=0)
    net = _network(models)
    with_adapter = sample_images(models, net, PROMPTS[:1], CFG, tmp_path / "on", step=0)
    diff = np.abs(_pixels(with_adapter[0]) - _pixels(base[0]))
    assert diff.mean() > 1.0  # the adapter's ΔW reaches the pixels
    net.set_multiplier(0.0)
    off = sample_images(models, net, PROMPTS[:1], CFG, tmp_path / "zero", step=0)
    assert np.abs(_pixels(off[0]) - _pixels(base[0])).max() <= 1  # multiplier 0 = the base (rounding only)
    net.set_multiplier(1.0)
    net.restore()
    again = sample_images(models, net, PROMPTS[:1], CFG, tmp_path / "restored", step=0)
    assert np.array_equal(_pixels(again[0]), _pixels(base[0]))


def test_train_flags_rng_and_grads_restored(tmp_path: Path) -> None:
    models = tiny_models(tmp_path)
    net = _network(models)
    models.unet.train()
    models.text_encoders[0].eval()
    models.unet.down_blocks[0].eval()  # a mixed state must come back as it was
    before = {n: m.training for n, m in models.unet.named_modules()}
    adapters_before = {n: m.training for n, m in net.named_modules()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample_images(models, net, PROMPTS[:1], CFG, tmp_path, step=0)
    assert torch.equal(torch.rand(3), expected)  # sampling did not consume the training RNG
    assert {n: m.training for n, m in models.unet.named_modules()} == before
    assert {n: m.training for n, m in net.named_modules()} == adapters_before
    assert not models.text_encoders[0].training
    assert all(p.grad is None for p in net.trainable_parameters())


def test_default_size_and_empty_prompts(tmp_path: Path) -> None:
    models = tiny_models(tmp_path)
    cfg = CFG.model_copy(update={"width": None, "height": None})
    assert sample_images(models, None, [], cfg, tmp_path, step=0) == []
    p = sample_images(models, None, ["a"], cfg, tmp_path, step=0, size=(40, 27))
    with Image.open(p[0]) as im:
        assert im.size == (40, 24)  # rounded down to a multiple of 8
    p = sample_images(models, None, ["a"], cfg, tmp_path, step=1)
    with Image.open(p[0]) as im:
        assert im.size == (32, 32)  # UNet sample_size 4 × VAE factor 8


def test_sdxl_pipeline(tmp_path: Path) -> None:
    models = tiny_models(tmp_path, "sdxl")
    base = sample_images(models, None, PROMPTS[:1], CFG, tmp_path / "base", step=0)
    net = _network(models)
    on = sample_images(models, net, PROMPTS[:1], CFG, tmp_path / "on", step=0)
    with Image.open(on[0]) as im:
        assert im.size == (48, 32)
    assert np.abs(_pixels(on[0]) - _pixels(base[0])).mean() > 1.0


def test_grid_wraps_long_captions() -> None:
    ims = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green", "white", "black")]
    grid = make_grid(ims, ["word " * 40] + ["x"] * 4)
    # 5 images → 4 columns, 2 rows; cells ×12 = 192 px; the long caption wraps to several lines
    assert grid.width == 8 + 4 * (192 + 8)
    assert grid.height > 2 * (192 + 16) + 4 * 13
    with pytest.raises(lc.InvalidConfigError):
        make_grid([], [])


def test_scheduler_follows_training_config(tmp_path: Path) -> None:
    from lyco_trainer.sampling import build_pipeline

    models = tiny_models(tmp_path)
    models.prediction = "v"
    sched = build_pipeline(models).scheduler
    assert type(sched).__name__ == "DDIMScheduler"
    assert sched.config.prediction_type == "v_prediction"
    assert not sched.config.clip_sample  # the DDPM training scheduler has clip_sample=True
    assert torch.equal(sched.betas, models.scheduler.betas)


def _demo_module() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "train_demo.py"
    spec = importlib.util.spec_from_file_location("lyco_train_demo", path)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_dataset_and_config(tmp_path: Path) -> None:
    """The demo's data is unbalanced (12 circles, 6 squares, some landscape) and its config balances it."""
    from lyco_trainer.config import load_config
    from lyco_trainer.loop import plan_run

    demo = _demo_module()
    counts = demo.write_dataset(tmp_path / "data")
    assert counts == {"circle": 12, "square": 6}
    first = _pixels(tmp_path / "data" / "shapes" / "circle" / "circle_00.png")
    demo.write_dataset(tmp_path / "data")  # rerun: same files, same pixels
    assert np.array_equal(first, _pixels(tmp_path / "data" / "shapes" / "circle" / "circle_00.png"))
    assert first.shape == (64, 96, 3)  # landscape
    red = first[..., 0] > 150
    assert red.mean() > 0.1  # a red shape is drawn
    cfg = load_config(demo.write_config(tmp_path / "train.toml", 3))
    assert cfg.network.algo == "lokr"
    assert cfg.data.root == tmp_path / "data"
    _, plan = plan_run(cfg)
    per_epoch = {name.split("/")[-1]: c["samples"] for name, c in plan.concepts.items()}
    assert per_epoch == {"circle": 12, "square": 12}  # balancing repeats the 6 squares twice
    assert plan.total_steps == 3 * plan.steps_per_epoch
    assert len(plan.buckets) == 2  # square and landscape buckets
