"""Training data: concept discovery, bad files, captions, balancing counts, buckets, epoch plans, image loading."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_concept, write_corrupt_png, write_image, write_truncated_jpeg
from PIL import Image

from lyco_core.errors import CorruptFileError, InvalidConfigError, LycoError, NotFoundError
from lyco_trainer.config import DataConfig, load_config
from lyco_trainer.data import (
    ImageItem,
    assign_bucket,
    batches_per_epoch,
    buckets_for,
    caption_for,
    captions_are_fixed,
    crop_box,
    discover,
    full_caption,
    load_image,
    make_buckets,
    parse_folder_name,
    plan_epoch,
)

TINY = {"resolution": 32, "bucket_step": 8, "bucket_min": 16, "bucket_max": 64}


def cfg_for(root: Path | None = None, **kw: object) -> DataConfig:
    return DataConfig.model_validate({"root": root, **TINY, **kw})


def epoch_counts(ds, cfg: DataConfig, epoch: int, seed: int = 0, batch_size: int = 3) -> Counter[str]:
    return Counter(it.path.name for b in plan_epoch(ds, cfg, batch_size, seed, epoch) for it in b.items)


# ---------------------------------------------------------------------------------------------- discovery


def test_folder_names_kohya_convention() -> None:
    assert parse_folder_name("10_sks dog") == (10, "sks", "dog", "sks dog")
    assert parse_folder_name("3_ohwx big cat") == (3, "ohwx", "big cat", "ohwx big cat")
    assert parse_folder_name("5_frieren") == (5, "frieren", None, "frieren")
    assert parse_folder_name("frieren") == (None, "frieren", None, "frieren")
    assert parse_folder_name("sks dog") == (None, "sks dog", None, "sks dog")
    assert parse_folder_name("0_x y") == (None, "0_x y", None, "0_x y")  # 0 repeats is not the kohya form


def test_hierarchy_triggers_and_concept_toml(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_concept(root / "anime" / "frieren", 3)
    write_concept(root / "anime" / "frieren" / "casual", 1)
    write_concept(root / "toys" / "10_sks dog", 2, suffix=".jpg")
    write_concept(root / "solo", 1)
    (root / "solo" / "concept.toml").write_text('trigger = "ohwx"\nclass_word = "cat"\nrepeats = 3\n')
    write_image(root / "loose.png")  # an image directly in the root: the root is a concept too
    write_concept(root / ".cache" / "x", 2)  # hidden folders are not searched
    ds = discover(cfg_for(root, balance=False))

    got = {c.name: (c.category, c.class_name, c.subclass, c.trigger, c.class_word, c.repeats) for c in ds.concepts}
    assert got == {
        "data": (None, "data", None, "data", None, 1),
        "anime/frieren": ("anime", "frieren", None, "frieren", None, 1),
        "anime/frieren/casual": ("anime", "frieren", "casual", "casual", None, 1),
        "solo": (None, "solo", None, "ohwx", "cat", 3),
        "toys/10_sks dog": ("toys", "sks dog", None, "sks", "dog", 10),
    }
    per_concept = Counter(it.concept.name for it in ds.items)
    assert per_concept == {"data": 1, "anime/frieren": 3, "anime/frieren/casual": 1, "solo": 1, "toys/10_sks dog": 2}
    assert all(it.size == (32, 32) for it in ds.items)
    rep = {c.name: c for c in ds.report.concepts}
    assert rep["toys/10_sks dog"].samples_per_epoch == 20  # balancing off: images × repeats
    assert rep["solo"].samples_per_epoch == 3
    assert ds.report.samples_per_epoch == 1 + 3 + 1 + 3 + 20
    item = next(it for it in ds.items if it.concept.name == "toys/10_sks dog")
    assert full_caption(item, ds_cfg := cfg_for(root)) == "sks dog, tag0, common"
    assert ds_cfg.keep_tokens == 1


def test_explicit_concepts_and_precedence(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_concept(root / "cat" / "3_tabby", 2)
    (root / "cat" / "3_tabby" / "concept.toml").write_text("repeats = 4\n")
    outside = tmp_path / "elsewhere" / "mydog"
    write_concept(outside, 2)
    cfg = DataConfig.model_validate({
        **TINY, "root": root,
        "concepts": [
            {"path": outside, "trigger": "zxq", "class_word": "dog"},
            {"path": root / "cat" / "3_tabby", "class_word": "kitty"},  # inside root: keeps its hierarchy
        ],
    })
    ds = discover(cfg)
    by = {c.name: c for c in ds.concepts}
    assert list(by) == ["cat/3_tabby", "mydog"]
    tabby = by["cat/3_tabby"]
    # folder name (repeats 3, trigger "tabby") < concept.toml (repeats 4) < [[data.concepts]] (class_word)
    assert (tabby.category, tabby.class_name, tabby.trigger, tabby.class_word, tabby.repeats) == (
        "cat", "tabby", "tabby", "kitty", 4)
    dog = by["mydog"]
    assert (dog.category, dog.class_name, dog.trigger, dog.class_word, dog.repeats) == (None, "mydog", "zxq", "dog", 1)
    assert len(ds.items) == 4

    # explicit fields beat concept.toml, and an explicit repeats beats the folder name's
    cfg2 = DataConfig.model_validate({**TINY, "concepts": [{"path": root / "cat" / "3_tabby", "repeats": 7}]})
    assert discover(cfg2).concepts[0].repeats == 7


def test_bad_files_are_skipped_and_counted(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "5_zkz robot"
    write_image(folder / "good.png", caption="zkz, red, metal")
    write_image(folder / "nocap.png")
    write_image(folder / "photo.jpg", (48, 32), caption="")  # an empty caption file: descriptor, no warning
    write_corrupt_png(folder / "cut.png")
    write_truncated_jpeg(folder / "cut.jpg")
    (folder / "fake.png").write_text("version https://git-lfs.github.com/spec/v1\n")
    (folder / "empty.webp").write_bytes(b"")
    (folder / "notes.json").write_text("{}")
    (folder / "README").write_text("hi")
    (folder / "orphan.txt").write_text("tags without an image")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    ds = discover(cfg_for(tmp_path / "data"))

    assert sorted(it.path.name for it in ds.items) == ["good.png", "nocap.png", "photo.jpg"]
    skipped = {Path(s.path).name: s.kind for s in ds.report.skipped}
    assert skipped == {
        "cut.png": "corrupt", "cut.jpg": "corrupt", "fake.png": "corrupt", "empty.webp": "corrupt",
        "notes.json": "not-image", "README": "not-image", "orphan.txt": "orphan-caption",
    }
    assert ds.report.skipped_counts() == {"corrupt": 4, "not-image": 2, "orphan-caption": 1}
    assert all(s.reason and "\n" not in s.reason for s in ds.report.skipped)
    [warning] = ds.report.warnings
    assert "nocap.png" in warning
    assert "'zkz robot'" in warning
    assert ds.report.concepts[0].missing_captions == 1

    cfg = cfg_for(tmp_path / "data", prefix="photo of ", suffix=", 4k")
    caps = {it.path.name: caption_for(it, cfg, random.Random(0)) for it in ds.items}
    assert caps == {
        "good.png": "photo of zkz robot, red, metal, 4k",  # the trigger tag is not repeated
        "nocap.png": "photo of zkz robot, 4k",
        "photo.jpg": "photo of zkz robot, 4k",
    }
    text = "\n".join(ds.report.summary_lines())
    assert "skipped 7 file(s)" in text
    assert "4 corrupt" in text
    json.loads(ds.report.model_dump_json())  # serialisable for the adapter metadata


def _one_line(e: pytest.ExceptionInfo[LycoError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_or_empty_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as e:
        discover(cfg_for(tmp_path / "nope"))
    assert "data.root" in _one_line(e)
    assert str(tmp_path / "nope") in str(e.value)

    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(InvalidConfigError) as e2:
        discover(cfg_for(tmp_path / "file.png"))
    assert "not a folder" in _one_line(e2)

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "x.txt").write_text("caption without image")
    write_corrupt_png(empty / "b" / "bad.png")
    with pytest.raises(NotFoundError) as e3:
        discover(cfg_for(empty))
    assert str(empty) in _one_line(e3)
    assert "no usable image" in str(e3.value)

    write_concept(tmp_path / "tree" / "cat" / "a", 1)
    with pytest.raises(NotFoundError) as e4:  # an explicit folder whose images are in sub-folders
        discover(DataConfig.model_validate({**TINY, "concepts": [{"path": tmp_path / "tree"}]}))
    assert "data.concepts[0].path" in _one_line(e4)
    assert "sub-folders" in str(e4.value)

    with pytest.raises(NotFoundError) as e5:
        discover(DataConfig.model_validate({**TINY, "concepts": [{"path": tmp_path / "tree" / "cat" / "a"},
                                                                  {"path": tmp_path / "gone"}]}))
    assert "data.concepts[1].path" in _one_line(e5)
    assert "gone" in str(e5.value)


@pytest.mark.parametrize(("text", "needle"), [
    ("colour = 'red'\n", "unknown key 'colour'"),
    ("repeats = 0\n", "repeats must be >= 1"),
    ("repeats = 'many'\n", "repeats must be a int"),
    ("trigger = [\n", "not valid TOML"),
])
def test_bad_concept_toml_names_the_file(tmp_path: Path, text: str, needle: str) -> None:
    write_concept(tmp_path / "c", 1)
    (tmp_path / "c" / "concept.toml").write_text(text)
    with pytest.raises(InvalidConfigError) as e:
        discover(cfg_for(tmp_path))
    assert needle in _one_line(e)
    assert str(tmp_path / "c" / "concept.toml") in str(e.value)


def test_discover_never_loads_a_model(tmp_path: Path) -> None:
    """A config pointing at a missing data folder fails in discover, without importing diffusers/transformers."""
    cfg_file = tmp_path / "train.toml"
    cfg_file.write_text('[model]\nbase = "no-such-model"\n[data]\nroot = "missing-images"\n')
    code = (
        "import sys\n"
        "from lyco_trainer.config import load_config\n"
        "from lyco_trainer.data import discover\n"
        "from lyco_core.errors import NotFoundError\n"
        f"cfg = load_config({str(cfg_file)!r})\n"
        "try:\n    discover(cfg.data)\nexcept NotFoundError as e:\n    print('ERR', e)\n"
        "print('diffusers' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == f"ERR data.root: no such folder: {tmp_path / 'missing-images'}"
    assert lines[1] == "False False"
    assert load_config(cfg_file).data.root == tmp_path / "missing-images"


# ---------------------------------------------------------------------------------------------- balancing


def _two_classes(tmp_path: Path, n_a: int, n_b: int) -> Path:
    root = tmp_path / "data"
    write_concept(root / "few", n_a)
    write_concept(root / "many", n_b)
    return root


def test_balancing_two_and_six_images(tmp_path: Path) -> None:
    root = _two_classes(tmp_path, 2, 6)
    few = {f"img_{i:02d}.png" for i in range(2)}

    def per_concept(ds, cfg: DataConfig, epoch: int = 0) -> tuple[Counter[str], Counter[str]]:
        c = epoch_counts(ds, cfg, epoch)
        return Counter({k: v for k, v in c.items() if k in few}), c

    cfg = cfg_for(root)  # balance is on by default
    ds = discover(cfg)
    # each "few" image 3× + each "many" image 1×; names overlap (img_00, img_01 in both), so count by path
    paths = Counter(str(it.path.relative_to(root)) for b in plan_epoch(ds, cfg, 3, 0, 0) for it in b.items)
    assert paths == {**{f"few/img_{i:02d}.png": 3 for i in range(2)}, **{f"many/img_{i:02d}.png": 1 for i in range(6)}}
    rep = {c.name: c for c in ds.report.concepts}
    assert (rep["few"].samples_per_epoch, rep["few"].effective_repeats) == (6, 3.0)
    assert (rep["many"].samples_per_epoch, rep["many"].effective_repeats) == (6, 1.0)
    assert ds.report.samples_per_epoch == 12
    assert ds.report.balance
    assert any("few: 2 image(s) × 3.00 = 6 per epoch" in line for line in ds.report.summary_lines())

    off = cfg_for(root, balance=False)
    paths = Counter(str(it.path.relative_to(root)) for b in plan_epoch(discover(off), off, 3, 0, 0) for it in b.items)
    assert set(paths.values()) == {1}
    assert len(paths) == 8

    (root / "few" / "concept.toml").write_text("repeats = 2\n")  # repeats multiply the balanced exposure
    ds = discover(cfg)
    paths = Counter(str(it.path.relative_to(root)) for b in plan_epoch(ds, cfg, 3, 0, 0) for it in b.items)
    assert sum(v for k, v in paths.items() if k.startswith("few/")) == 12
    assert sum(v for k, v in paths.items() if k.startswith("many/")) == 6
    assert {k: v for k, v in paths.items() if k.startswith("few/")} == {"few/img_00.png": 6, "few/img_01.png": 6}


def test_balancing_remainders_rotate_over_epochs(tmp_path: Path) -> None:
    """4 vs 6 images: the 4 share 6 samples per epoch (two images twice), and over 2 epochs each gets exactly 3."""
    root = _two_classes(tmp_path, 4, 6)
    cfg = cfg_for(root)
    ds = discover(cfg)
    totals: Counter[str] = Counter()
    n_batches = {len(plan_epoch(ds, cfg, 4, 7, e)) for e in range(4)}
    assert n_batches == {batches_per_epoch(ds, cfg, 4)}  # the same number of batches every epoch
    for epoch in range(2):
        paths = Counter(str(it.path.relative_to(root)) for b in plan_epoch(ds, cfg, 4, 7, epoch) for it in b.items)
        few = {k: v for k, v in paths.items() if k.startswith("few/")}
        assert sum(few.values()) == 6
        assert sorted(few.values()) == [1, 1, 2, 2]
        assert sum(v for k, v in paths.items() if k.startswith("many/")) == 6
        totals.update(few)
    assert set(totals.values()) == {3}


def test_balancing_across_buckets_keeps_concept_totals(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_concept(root / "mixed", 2, size=(32, 32))
    write_image(root / "mixed" / "wide_a.png", (64, 32))
    write_image(root / "mixed" / "wide_b.png", (64, 32))
    write_image(root / "mixed" / "wide_c.png", (64, 32))
    write_concept(root / "big", 7)
    cfg = cfg_for(root)
    ds = discover(cfg)
    per_bucket = []
    for epoch in range(5):
        plan = plan_epoch(ds, cfg, 2, 1, epoch)
        mixed = [it for b in plan for it in b.items if it.concept.name == "mixed"]
        assert len(mixed) == 7  # balanced to the 7 images of "big"
        per_bucket.append(Counter(b.bucket for b in plan for _ in b.items))
    assert all(p == per_bucket[0] for p in per_bucket)


# ---------------------------------------------------------------------------------------------- buckets


def test_buckets_match_sd_scripts() -> None:
    # sd-scripts make_bucket_resolutions((512, 512), 256, 1024, 64), worked out by hand from its formula
    expected = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                (1024, 256)]
    assert make_buckets(512, 64, 256, 1024) == expected
    for w, h in make_buckets(1024, 64, 256, 2048):
        assert w % 64 == 0
        assert h % 64 == 0
        assert min(w, h) >= 256
        assert max(w, h) <= 2048
        assert w * h <= 1024 * 1024
    # a bucket_min off the step starts at the next multiple
    assert min(w for w, _ in make_buckets(512, 64, 300, 1024)) == 320
    with pytest.raises(InvalidConfigError, match="bucket_step"):
        make_buckets(32, 64, 16, 64)


def test_bucket_assignment_wide_tall_square(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_image(root / "c" / "wide.png", (64, 32))
    write_image(root / "c" / "tall.png", (32, 64))
    write_image(root / "c" / "square.png", (50, 50))
    write_image(root / "c" / "pano.jpg", (200, 40))
    cfg = cfg_for(root)
    assert buckets_for(cfg) == [
        (16, 48), (16, 56), (16, 64), (24, 40), (32, 32), (40, 24), (48, 16), (56, 16), (64, 16)]
    ds = discover(cfg)
    got = {it.path.name: assign_bucket(it.size, buckets_for(cfg)) for it in ds.items}
    # 2:1 → 40×24 (ratio 1.67; 48×16 is 3.0), 1:2 → 24×40, 5:1 → 64×16 (4.0), square → 32×32
    assert got == {"wide.png": (40, 24), "tall.png": (24, 40), "square.png": (32, 32), "pano.jpg": (64, 16)}
    assert ds.report.buckets == {"24x40": 1, "32x32": 1, "40x24": 1, "64x16": 1}

    for b in plan_epoch(ds, cfg, 4, 0, 0):  # a batch holds one bucket only
        assert all(got[it.path.name] == b.bucket for it in b.items)
        for it in b.items:
            assert load_image(it, b.bucket).shape == (3, b.bucket[1], b.bucket[0])

    flat = cfg_for(root, buckets=False)
    assert buckets_for(flat) == [(32, 32)]
    assert {b.bucket for b in plan_epoch(discover(flat), flat, 4, 0, 0)} == {(32, 32)}
    with pytest.raises(InvalidConfigError, match="multiple of 8"):
        buckets_for(cfg_for(root, buckets=False, resolution=36))

    # default bucket_min (256) above a 32 px resolution: only the square bucket, and the report says so
    only_square = DataConfig.model_validate({"root": root, "resolution": 32, "bucket_step": 8})
    assert buckets_for(only_square) == [(32, 32)]
    assert any("only the square bucket" in w for w in discover(only_square).report.warnings)


def test_plan_is_deterministic_and_batches_are_full(tmp_path: Path) -> None:
    root = _two_classes(tmp_path, 3, 5)
    cfg = cfg_for(root)
    ds = discover(cfg)

    def order(seed: int, epoch: int) -> list[list[str]]:
        return [[str(it.path) for it in b.items] for b in plan_epoch(ds, cfg, 4, seed, epoch)]

    assert order(3, 1) == order(3, 1)
    assert order(3, 1) != order(3, 2)
    assert order(3, 1) != order(4, 1)
    plan = plan_epoch(ds, cfg, 4, 3, 1)
    assert sorted(len(b.items) for b in plan) == [2, 4, 4]  # 10 samples in one bucket
    assert batches_per_epoch(ds, cfg, 4) == 3


# ---------------------------------------------------------------------------------------------- images


def _item(path: Path, size: tuple[int, int] | None = None) -> ImageItem:
    from lyco_trainer.data import Concept

    c = Concept("c", path.parent, None, "c", None, "c", None, 1)
    with Image.open(path) as im:
        return ImageItem(path, None, c, size or im.size)


def test_load_image_center_crop_and_range(tmp_path: Path) -> None:
    arr = np.zeros((32, 64, 3), dtype=np.uint8)  # black | white (middle 32 px) | black
    arr[:, 16:48] = 255
    Image.fromarray(arr).save(tmp_path / "stripes.png")
    x = load_image(_item(tmp_path / "stripes.png"), (32, 32))
    assert x.dtype == torch.float32
    assert x.shape == (3, 32, 32)
    assert torch.equal(x, torch.ones_like(x))  # the center crop is the white stripe

    arr = np.zeros((64, 64, 3), dtype=np.uint8)  # left half red, right half blue, scaled down 2×
    arr[:, :32, 0] = 255
    arr[:, 32:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "halves.png")
    y = load_image(_item(tmp_path / "halves.png"), (32, 32))
    assert torch.allclose(y[0, :, :14], torch.ones(32, 14), atol=1e-2)
    assert torch.allclose(y[2, :, :14], -torch.ones(32, 14), atol=1e-2)
    assert torch.allclose(y[2, :, 18:], torch.ones(32, 14), atol=1e-2)
    assert y.min() >= -1.0
    assert y.max() <= 1.0

    assert crop_box((64, 32), (32, 32)).resized == (64, 32)
    c = crop_box((100, 50), (40, 24))  # cover: scale max(0.4, 0.48) = 0.48 → 48×24, crop 4 px from the left
    assert (c.resized, c.left, c.top) == ((48, 24), 4, 0)


def test_exif_orientation_and_transparency(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "c"
    folder.mkdir(parents=True)
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white before rotation
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    Image.fromarray(arr).save(folder / "rot.jpg", exif=exif, quality=95)
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent black → white
    Image.fromarray(rgba, "RGBA").save(folder / "clear.png")
    ds = discover(cfg_for(tmp_path / "data", buckets=False))
    sizes = {it.path.name: it.size for it in ds.items}
    assert sizes == {"rot.jpg": (20, 40), "clear.png": (16, 16)}
    rot = next(it for it in ds.items if it.path.name == "rot.jpg")
    x = load_image(rot, (20, 40))
    assert x.shape == (3, 40, 20)
    # rotated clockwise, the white left half becomes the top half
    assert x[:, :16].mean() > 0.9
    assert x[:, 24:].mean() < -0.9
    clear = next(it for it in ds.items if it.path.name == "clear.png")
    assert torch.equal(load_image(clear, (16, 16)), torch.ones(3, 16, 16))

    (folder / "clear.png").write_bytes(b"gone")
    with pytest.raises(CorruptFileError, match=r"clear\.png"):
        load_image(clear, (16, 16))


# ---------------------------------------------------------------------------------------------- captions


def _captioned(tmp_path: Path, caption: str, folder: str = "3_sks dog") -> tuple[ImageItem, DataConfig]:
    write_image(tmp_path / "d" / folder / "a.png", caption=caption)
    cfg = cfg_for(tmp_path / "d")
    return discover(cfg).items[0], cfg


def test_caption_descriptor_and_shuffle_keep_tokens(tmp_path: Path) -> None:
    item, cfg = _captioned(tmp_path, "sks, 1girl,  smile,\noutdoors , , hat")
    assert full_caption(item, cfg) == "sks dog, 1girl, smile, outdoors, hat"
    assert captions_are_fixed(cfg)
    assert caption_for(item, cfg, random.Random(0)) == "sks dog, 1girl, smile, outdoors, hat"

    for keep in (1, 2):
        sh = cfg.model_copy(update={"shuffle_tags": True, "keep_tokens": keep})
        assert not captions_are_fixed(sh)
        rng = random.Random(5)
        draws = [caption_for(item, sh, rng).split(", ") for _ in range(60)]
        head = ["sks dog", "1girl"][:keep]
        assert all(d[:keep] == head for d in draws)
        assert all(sorted(d) == sorted(["sks dog", "1girl", "smile", "outdoors", "hat"]) for d in draws)
        assert len({tuple(d) for d in draws}) > 3
        assert caption_for(item, sh, random.Random(9)) == caption_for(item, sh, random.Random(9))


def test_caption_and_tag_dropout_rates(tmp_path: Path) -> None:
    item, cfg = _captioned(tmp_path, "a, b, c, d")
    rng = random.Random(1)
    drop_all = cfg.model_copy(update={"tag_dropout": 1.0})
    assert caption_for(item, drop_all, rng) == "sks dog"  # kept tokens survive tag dropout
    assert caption_for(item, cfg.model_copy(update={"caption_dropout": 1.0, "prefix": "x "}), rng) == ""

    half = cfg.model_copy(update={"tag_dropout": 0.5})
    kept = [len(caption_for(item, half, rng).split(", ")) - 1 for _ in range(2000)]
    assert abs(np.mean(kept) / 4 - 0.5) < 0.04  # 8000 Bernoulli(0.5) draws: sd ≈ 0.006

    some = cfg.model_copy(update={"caption_dropout": 0.3})
    empty = sum(caption_for(item, some, rng) == "" for _ in range(2000))
    assert abs(empty / 2000 - 0.3) < 0.04
    nothing = cfg.model_copy(update={"keep_tokens": 0, "tag_dropout": 1.0, "prefix": "<", "suffix": ">"})
    assert caption_for(item, nothing, rng) == "<>"


def test_empty_trigger_from_concept_toml(tmp_path: Path) -> None:
    write_image(tmp_path / "d" / "style" / "a.png", caption="watercolor, tree")
    (tmp_path / "d" / "style" / "concept.toml").write_text('trigger = ""\n')
    cfg = cfg_for(tmp_path / "d")
    item = discover(cfg).items[0]
    assert item.concept.descriptor == ""
    assert full_caption(item, cfg) == "watercolor, tree"
