"""A whole `lyco eval` on tiny models: tiny SD pipeline, two random adapters, two concepts, tiny encoders.

Checks that every expected row is there and finite, that ranks are consistent with the values, that a few values
equal an independent recomputation from the encoders (image similarity on dataset × generated, the paired style
loss against the base image of the same prompt and seed, trigger-free CLIP texts), that the report references
files that exist, and that a second run (through the CLI) generates and encodes nothing.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lyco_core as lc
from lyco_core.cli.main import main
from lyco_evaluator.aggregate import BASE_ID
from lyco_evaluator.config import load_config
from lyco_evaluator.encoders import load_encoder
from lyco_evaluator.runner import METRIC_TYPES, evaluate
from lyco_trainer.config import ModelConfig
from lyco_trainer.models import load_base, write_tiny_pipeline

N = 2
TYPES = ["train", "trigger", "alter", "style", "agnostic"]
METRICS = ["image_similarity", "scd", "text_similarity", "vendi", "style_loss"]


def _dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    specs = {"toy/lun": ("stuffed toy", 3, "lun stuffed toy, red"), "scene/shld": ("scene", 2, "shld scene, sky")}
    for folder, (cls_word, n, caption) in specs.items():
        d = root / folder
        d.mkdir(parents=True)
        (d / "concept.toml").write_text(f'class_word = "{cls_word}"\n')
        for i in range(n):
            size = (40, 32) if i % 2 else (32, 48)  # mixed aspects: references are padded
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i}.png")
            (d / f"{i}.txt").write_text(f"{caption} {i}")


def _adapters(base: Path, out: Path) -> list[Path]:
    models = load_base(ModelConfig(base=base))
    paths = []
    for k, (algo, opts) in enumerate([("lora", {"dim": 4, "alpha": 2}), ("loha", {"dim": 4, "alpha": 2})]):
        torch.manual_seed(10 + k)
        net = lc.create_network({"unet": models.unet, "te": models.text_encoders[0]}, algo=algo, preset="attn-mlp",
                                **opts)
        with torch.no_grad():  # trained-like: both factors nonzero, so the images change
            for p in net.trainable_parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        meta = {"training": {"epochs": 5 * (k + 1), "unet_lr": 1e-4 * (k + 1)}}
        paths.append(net.save(out / f"{algo}.safetensors", metadata=meta))
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    base = write_tiny_pipeline(tmp / "base")
    _dataset(tmp / "data")
    lora, loha = _adapters(base, tmp)
    (tmp / "eval.toml").write_text(f"""
[model]
base = "base"
[[checkpoints]]
path = "{lora.name}"
[[checkpoints]]
path = "{loha.name}"
name = "my-loha"
preset = "attn-mlp"
[data]
root = "data"
[prompts]
n_images = {N}
types = {json.dumps(TYPES)}
text_map = {{ lun = "lobster" }}
[generation]
steps = 2
width = 32
height = 32
batch_size = 8
device = "cpu"
[encoders]
tiny = true
device = "cpu"
[metrics]
enabled = {json.dumps(METRICS)}
[report]
grid_images = 2
[output]
dir = "out"
""")
    return tmp


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def test_end_to_end(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(setup / "eval.toml")
    res = evaluate(cfg)
    out = setup / "out"
    for name in ("results.csv", "results.json", "aggregates.csv", "report.html", "prompts.csv"):
        assert (out / name).is_file(), name
    assert res.stats["images_generated"] == 3 * 2 * len(TYPES) * N  # base + 2 checkpoints, 2 concepts

    # rows: checkpoints × concepts × prompt types × metrics, as the protocol says
    ckpts = [BASE_ID, "lora", "my-loha"]
    expected = {
        (ck, concept, pt, m)
        for ck in ckpts for concept in ("toy/lun", "scene/shld") for pt in TYPES for m in METRICS
        if pt in METRIC_TYPES[m] and not (m == "style_loss" and ck == BASE_ID)
    }
    csv_rows = _csv_rows(out / "results.csv")
    got = {(r["checkpoint"], r["concept"], r["prompt_type"], r["metric"]) for r in csv_rows}
    assert got == expected
    assert len(csv_rows) == len(expected) == len(res.rows)
    for r in csv_rows:
        assert math.isfinite(float(r["value"])), r
        if r["checkpoint"] == BASE_ID:
            assert r["rank"] == ""
        else:
            assert 0.0 <= float(r["rank"]) <= 1.0
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["rows"]) == len(expected)
    assert {c["id"] for c in doc["checkpoints"]} == {"lora", "my-loha"}

    # ranks agree with the values: with two checkpoints the better one gets 1 (or both 0.5 on a tie)
    by_key = {(r.checkpoint, r.concept, r.prompt_type, r.metric): r for r in res.rows}
    for ck, concept, pt, m in expected:
        if ck != "lora":
            continue
        a, b = by_key[("lora", concept, pt, m)], by_key[("my-loha", concept, pt, m)]
        up = m in ("image_similarity", "text_similarity", "vendi")
        if pt == "agnostic" and m in ("image_similarity", "scd"):
            up = not up  # concept leak: looking like the dataset without the trigger is bad
        if a.value == b.value:
            assert a.rank == b.rank == 0.5
        else:
            assert a.rank == (1.0 if (a.value > b.value) == up else 0.0)
            assert a.rank is not None
            assert b.rank == 1.0 - a.rank

    # checkpoint facts from the adapter metadata and the config
    infos = {i.id: i for i in res.checkpoints}
    assert (infos["lora"].algo, infos["lora"].epoch, infos["lora"].dim, infos["lora"].lr) == ("lora", 5, 4, 1e-4)
    assert (infos["my-loha"].algo, infos["my-loha"].preset, infos["my-loha"].epoch) == ("loha", "attn-mlp", 10)

    # independent recomputation of a few values from the encoders
    imgs = [i for i in res.images if i.concept == "toy/lun"]
    dino = load_encoder("dinov2", None, tiny=True, device="cpu")
    refs = [Image.open(p).convert("RGB") for p in sorted((setup / "data/toy/lun").glob("*.png"))]
    gen = [i for i in imgs if i.checkpoint == "lora" and i.prompt_type == "train"]
    gen.sort(key=lambda i: i.seed)
    x = torch.nn.functional.normalize(dino.image_features(refs, reference=True, mode="padding").double(), dim=1)
    y = torch.nn.functional.normalize(dino.image_features([Image.open(i.path) for i in gen]).double(), dim=1)
    assert by_key[("lora", "toy/lun", "train", "image_similarity")].value == pytest.approx(
        float((x @ y.T).mean()), rel=1e-5)

    vgg = load_encoder("vgg19", None, tiny=True, device="cpu")

    def grams(path: Path) -> list[torch.Tensor]:
        out = []
        for f in vgg.feature_maps([Image.open(path)]):
            _, c, h, w = f.shape
            m = f[0].reshape(c, h * w).double()
            out.append(m @ m.T / (c * h * w))
        return out

    style = sorted((i for i in imgs if i.prompt_type == "style"), key=lambda i: (i.checkpoint, i.seed))
    base_img = {i.seed: i.path for i in style if i.checkpoint == BASE_ID}
    losses = []
    for i in (i for i in style if i.checkpoint == "my-loha"):
        losses.append(sum(float(((a - b) ** 2).sum()) for a, b in zip(grams(i.path), grams(base_img[i.seed]))))
    assert len(losses) == N
    assert by_key[("my-loha", "toy/lun", "style", "style_loss")].value == pytest.approx(float(np.mean(losses)),
                                                                                         rel=1e-4)
    assert min(losses) > 0  # the adapter changes the images

    # the CLIP texts of controllability: trigger mapped (lun → lobster) or removed (shld), whole words only
    prompts = _csv_rows(out / "prompts.csv")
    alter_lun = [p for p in prompts if p["concept"] == "toy/lun" and p["prompt_type"] == "alter"]
    assert alter_lun
    assert all("lun " in p["prompt"] and "lobster stuffed toy" in p["clip_text"] for p in alter_lun)
    shld = [p for p in prompts if p["concept"] == "scene/shld" and p["prompt_type"] == "trigger"]
    assert shld
    assert all(not re.search(r"\bshld\b", p["clip_text"]) for p in shld)

    # the report: every image it shows exists; grids per prompt type; the ranking table
    html = (out / "report.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", html)
    assert srcs
    assert all((out / s).is_file() for s in srcs)
    for pt in TYPES:
        assert f"grids/toy_lun-{pt}.jpg" in srcs
    assert any(s.startswith("plots/scatter-all-") for s in srcs)
    assert "Fidelity" in html
    assert "Controllability" in html
    for crit, per in res.ranking.items():
        assert sorted(per.values()) in ([1.0, 2.0], [1.5, 1.5]), crit

    # second run through the CLI: everything comes from the caches, same numbers
    before = (out / "results.csv").read_text()
    capsys.readouterr()
    assert main(["eval", str(setup / "eval.toml"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stats"]["images_generated"] == 0
    assert summary["stats"]["feature_cache_misses"] == 0
    assert summary["stats"]["feature_cache_hits"] > 0
    assert (out / "results.csv").read_text() == before
