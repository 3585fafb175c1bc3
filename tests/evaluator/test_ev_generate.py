"""Evaluation image generation on the tiny pipeline: pixels against plain diffusers (base, merged LoRA, a
pipeline folder), the image cache (re-runs make no pipeline call; only new images are made), batch invariance,
the base restored after an adapter, and what enters the cache key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import lyco_core as lc
from lyco_core.errors import IncompatibleBaseError, InvalidConfigError, NotFoundError
from lyco_evaluator.config import CheckpointSpec, EvalConfig, base_checkpoint, expand_checkpoints, parse_config
from lyco_evaluator.generate import (
    GeneratedImage,
    HashCache,
    checkpoint_identity,
    generate,
    image_key,
    read_index,
    settings_of,
)
from lyco_evaluator.prompts import build_prompts
from lyco_trainer.config import ModelConfig
from lyco_trainer.models import load_base, write_tiny_pipeline

SIZE = 32
STEPS = 2


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1 pipeline (base), a second one (a 'full fine-tune'), a LoRA file and a two-concept dataset."""
    root = tmp_path_factory.mktemp("ev_generate")
    write_tiny_pipeline(root / "base", seed=0)
    write_tiny_pipeline(root / "native", seed=1)
    models = load_base(ModelConfig(base=root / "base"))
    net = lc.create_network({"unet": models.unet, "te": models.text_encoders[0]}, algo="lora", preset="attn-mlp",
                            dim=4, alpha=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-like values (lora_up starts at zero)
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    lc.save_adapter(net, root / "lora.safetensors")
    for folder, colour in (("toy/10_lun stuffed toy", (200, 30, 30)), ("style/veli style", (30, 30, 200))):
        d = root / "data" / folder
        d.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (24, 16), colour).save(d / f"{i}.png")
            (d / f"{i}.txt").write_text(f"tag{i}")
    return root


def make_cfg(root: Path, **over: Any) -> EvalConfig:
    doc: dict[str, Any] = {
        "model": {"base": "base"},
        "checkpoints": [{"path": "lora.safetensors"}],
        "data": {"root": "data"},
        "prompts": {"types": ["trigger", "style"], "n_images": 2},
        "generation": {"steps": STEPS, "width": SIZE, "height": SIZE, "batch_size": 4},
        "encoders": {"tiny": True},
    }
    for dotted, value in over.items():
        table, key = dotted.split("__")
        doc.setdefault(table, {})[key] = value
    return parse_config(doc, "test", root)


class Counter:
    """Counts pipeline calls and images per checkpoint (``on_batch``)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.images: dict[str, int] = {}

    def __call__(self, checkpoint: str, n: int) -> None:
        self.calls[checkpoint] = self.calls.get(checkpoint, 0) + 1
        self.images[checkpoint] = self.images.get(checkpoint, 0) + n


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def by(records: list[GeneratedImage], checkpoint: str) -> dict[tuple[str, str, int], GeneratedImage]:
    return {(r.concept, r.prompt, r.seed): r for r in records if r.checkpoint == checkpoint}


# --------------------------------------------------------------------------------------------- independent pipelines
def diffusers_images(folder: Path, prompts: list[str], seeds: list[int], lora: Path | None = None,
                     strength: float = 1.0) -> list[np.ndarray]:
    """Plain diffusers: from_pretrained, a DDIM scheduler with SD's released settings, a LoRA merged by hand
    (W += strength · alpha/r · up @ down, from the file's tensors), one image per call."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, steps_offset=1,
                                               set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        from safetensors.torch import load_file

        tensors = load_file(str(lora))
        layers = {f"lora_unet_{n.replace('.', '_')}": m for n, m in pipe.unet.named_modules()}
        # kohya names the text encoder's modules below CLIPTextModel's text_model (transformers 5 drops that level)
        layers |= {f"lora_te_text_model_{n.removeprefix('text_model.').replace('.', '_')}": m
                   for n, m in pipe.text_encoder.named_modules() if n}
        keys = {k.split(".")[0] for k in tensors}
        assert keys <= set(layers), sorted(keys - set(layers))[:3]
        with torch.no_grad():
            for key in keys:
                up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
                r = down.shape[0]
                scale = float(tensors[f"{key}.alpha"]) / r
                w = layers[key].weight
                delta = (up.reshape(up.shape[0], r).float() @ down.reshape(r, -1).float()).reshape(w.shape)
                w += strength * scale * delta
    out = []
    for prompt, seed in zip(prompts, seeds):
        gen = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            im = pipe(prompt, num_inference_steps=STEPS, guidance_scale=7.0, width=SIZE, height=SIZE, generator=gen,
                      output_type="pil").images[0]
        out.append(np.asarray(im.convert("RGB")).astype(np.int16))
    return out


# --------------------------------------------------------------------------------------------- tests
def test_images_match_plain_diffusers_and_reruns_are_cached(world: Path, tmp_path: Path) -> None:
    cfg = make_cfg(world, generation__batch_size=3)
    cks = expand_checkpoints(cfg)
    prompts = build_prompts(cfg.data, cfg)
    count = Counter()
    recs = generate(cfg, cks, prompts, tmp_path / "out", on_batch=count)

    n_per = sum(p.n_images for p in prompts)  # 2 concepts: trigger 2 + style 2 (toy only; not for the style)
    assert n_per == 6
    assert [r.checkpoint for r in recs] == ["base"] * n_per + ["lora"] * n_per
    assert count.images == {"base": 6, "lora": 6}
    assert count.calls == {"base": 2, "lora": 2}  # batches of 3
    assert all(not r.cached and r.path.is_file() and r.path.parent == tmp_path / "out" / "images" for r in recs)
    assert len({r.key for r in recs}) == 12
    # pairing index: image k of a (concept, type) set has seed 1000 + k
    assert all(r.seed == cfg.generation.seed + r.index for r in recs)
    with Image.open(recs[0].path) as im:
        assert (im.size, im.format) == ((SIZE, SIZE), "PNG")
        assert json.loads(im.info["lyco-eval"])["checkpoint"] == "base"

    # the pixels are what plain diffusers makes, for the base and with the LoRA merged by hand
    sample = [r for r in recs if r.prompt_type == "style"][:2] + [r for r in recs if r.prompt_type == "trigger"][:1]
    texts, seeds = [r.prompt for r in sample], [r.seed for r in sample]
    for ref, r in zip(diffusers_images(world / "base", texts, seeds), sample):
        assert np.abs(pixels(r.path) - ref).max() <= 2
    lora_recs = by(recs, "lora")
    lora_sample = [lora_recs[(r.concept, r.prompt, r.seed)] for r in sample]
    refs = diffusers_images(world / "base", texts, seeds, lora=world / "lora.safetensors")
    for ref, r, b in zip(refs, lora_sample, sample):
        assert np.abs(pixels(r.path) - ref).max() <= 3
        assert np.abs(pixels(r.path) - pixels(b.path)).mean() > 2.0, "the LoRA must change the image"

    # the index file holds the same records
    assert read_index(tmp_path / "out") == recs

    # a re-run: no pipeline call, the same files untouched
    mtimes = {r.path: r.path.stat().st_mtime_ns for r in recs}
    count2 = Counter()
    again = generate(cfg, cks, prompts, tmp_path / "out", on_batch=count2)
    assert count2.calls == {}
    assert [(r.key, r.path) for r in again] == [(r.key, r.path) for r in recs]
    assert all(r.cached for r in again)
    assert {r.path: r.path.stat().st_mtime_ns for r in again} == mtimes

    # more images per class and a second strength: only the new images are made
    cfg3 = make_cfg(world, generation__batch_size=3, prompts__n_images=3)
    cfg3.checkpoints[0].strengths = [1.0, 0.5]
    cks3 = expand_checkpoints(cfg3)
    assert [c.id for c in cks3] == ["lora@1", "lora@0.5"]
    count3 = Counter()
    recs3 = generate(cfg3, cks3, build_prompts(cfg3.data, cfg3), tmp_path / "out", on_batch=count3)
    # per checkpoint now: trigger 3 × 2 concepts + style 3 = 9; new: seed 1002 of each trigger set and of the
    # style set (a third template); lora@1 is the earlier "lora" (same file and strength), lora@0.5 is all new
    assert count3.images == {"base": 3, "lora@1": 3, "lora@0.5": 9}
    assert len(recs3) == 27
    assert {r.key for r in recs3 if r.cached} == {r.key for r in recs}  # every earlier image is reused
    assert {r.key for r in recs3 if r.checkpoint == "lora@1"} >= {r.key for r in recs if r.checkpoint == "lora"}


def test_batch_size_does_not_change_images_and_base_is_restored(world: Path, tmp_path: Path) -> None:
    cfg1 = make_cfg(world, generation__batch_size=1, generation__base_reference=False)
    cfg4 = make_cfg(world, generation__batch_size=4)
    prompts = build_prompts(cfg1.data, cfg1)
    lora = expand_checkpoints(cfg1)
    # adapter first, then the base: the base's images must come out as if no adapter had ever been applied
    recs1 = generate(cfg1, [*lora, base_checkpoint()], prompts, tmp_path / "b1")
    recs4 = generate(cfg4, lora, prompts, tmp_path / "b4")  # base first here
    for ck in ("base", "lora"):
        a, b = by(recs1, ck), by(recs4, ck)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].key == b[k].key  # batch size is not a setting of the image
            assert np.abs(pixels(a[k].path) - pixels(b[k].path)).max() <= 1


def test_strength_zero_equals_base_and_pipeline_folder_checkpoint(world: Path, tmp_path: Path) -> None:
    cfg = make_cfg(world, prompts__types=["trigger"], prompts__n_images=1)
    cfg.checkpoints[0].strength = 0.0
    cfg.checkpoints.append(cfg.checkpoints[0].model_copy(update={"path": world / "native", "name": None,
                                                                "strength": 1.0}))
    cks = expand_checkpoints(cfg)
    assert [(c.id, c.kind, c.algo) for c in cks] == [("lora", "adapter", "lora"), ("native", "model", "full")]
    prompts = build_prompts(cfg.data, cfg)
    recs = generate(cfg, cks, prompts, tmp_path / "out")
    base, zero, native = by(recs, "base"), by(recs, "lora"), by(recs, "native")
    for k in base:
        assert zero[k].key != base[k].key  # a different checkpoint/strength is a different cache entry
        assert np.array_equal(pixels(zero[k].path), pixels(base[k].path))
        assert np.abs(pixels(native[k].path) - pixels(base[k].path)).mean() > 2.0
    texts = [r.prompt for r in native.values()]
    seeds = [r.seed for r in native.values()]
    for ref, r in zip(diffusers_images(world / "native", texts, seeds), native.values()):
        assert np.abs(pixels(r.path) - ref).max() <= 2


def test_cache_key_parts(world: Path, tmp_path: Path) -> None:
    cfg = make_cfg(world)
    hashes = HashCache(tmp_path / "h.json")
    spec = expand_checkpoints(cfg)[0]
    ident = checkpoint_identity(spec, hashes)
    assert ident == lc.formats.safetensors_io.payload_sha256(world / "lora.safetensors")
    s = settings_of(cfg, "fp32")
    k = image_key("B", ident, 1.0, "p", 1000, s)
    assert k != image_key("B", ident, 0.5, "p", 1000, s)
    assert k != image_key("B", ident, 1.0, "p", 1001, s)
    assert k != image_key("B", ident, 1.0, "q", 1000, s)
    assert k != image_key("C", ident, 1.0, "p", 1000, s)
    assert k != image_key("B", ident, 1.0, "p", 1000, {**s, "steps": 3})
    assert k != image_key("B", ident, 1.0, "p", 1000, settings_of(cfg, "fp16"))
    # the same tensors with other metadata are the same checkpoint (payload hash)
    other = tmp_path / "renamed.safetensors"
    tensors = lc.formats.safetensors_io.load_tensors(world / "lora.safetensors")
    lc.formats.safetensors_io.save_tensors(other, tensors, {"note": "different metadata"})
    assert checkpoint_identity(spec.model_copy(update={"path": other}), hashes) == ident
    # hashes are remembered: a second cache object reads them from the file
    hashes.save()
    again = HashCache(tmp_path / "h.json")
    assert again.entries == hashes.entries
    assert len(again.entries) == 2


def test_bad_adapter_and_duplicate_ids(world: Path, tmp_path: Path) -> None:
    cfg = make_cfg(world, prompts__types=["trigger"], prompts__n_images=1)
    prompts = build_prompts(cfg.data, cfg)
    # an adapter for another model: a module key the tiny UNet does not have
    bad = tmp_path / "other.safetensors"
    lc.formats.safetensors_io.save_tensors(bad, {
        "lora_unet_nowhere_proj.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_nowhere_proj.lora_up.weight": torch.zeros(8, 2),
        "lora_unet_nowhere_proj.alpha": torch.tensor(2.0),
    })
    spec = CheckpointSpec(id="other", path=bad)
    with pytest.raises(IncompatibleBaseError, match=r"other\.safetensors"):
        generate(cfg, [spec], prompts, tmp_path / "out")
    with pytest.raises(InvalidConfigError, match="'x' is used twice"):
        generate(cfg, [CheckpointSpec(id="x", path=bad), CheckpointSpec(id="x", path=bad)], prompts,
                 tmp_path / "out2")


def test_sdxl_tiny_pipeline(tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path / "xl", family="sdxl")
    data = tmp_path / "data" / "sks"
    data.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "a.png")
    cfg = parse_config({"model": {"base": "xl"}, "data": {"root": "data"}, "encoders": {"tiny": True},
                        "prompts": {"types": ["trigger"], "n_images": 2},
                        "generation": {"steps": 2, "width": 32, "height": 32}}, "t", tmp_path)
    recs = generate(cfg, [], build_prompts(cfg.data, cfg), tmp_path / "out")
    assert [(r.checkpoint, r.prompt, r.seed) for r in recs] == [("base", "sks", 1000), ("base", "sks", 1001)]
    a, b = (pixels(r.path) for r in recs)
    assert a.shape == (32, 32, 3)
    assert np.abs(a - b).mean() > 0.5  # two seeds, two images
    count = Counter()
    assert all(r.cached for r in generate(cfg, [], build_prompts(cfg.data, cfg), tmp_path / "out", on_batch=count))
    assert count.calls == {}
    shutil.rmtree(tmp_path / "xl")
    with pytest.raises(NotFoundError, match=r"model\.base"):
        generate(cfg, [], build_prompts(cfg.data, cfg), tmp_path / "out")
