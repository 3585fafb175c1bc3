"""Evaluation prompts and config: the official expansion (counts, consecutive seeds), each prompt type, trigger and
class substitution, text-similarity cleanup, template files and their override folder; the TOML config (relative
paths, --set, errors naming the key) and checkpoint expansion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import lyco_core as lc
from lyco_core.errors import InvalidConfigError, NotFoundError
from lyco_evaluator.config import EvalConfig, expand_checkpoints, load_config, parse_config
from lyco_evaluator.prompts import (
    SHIPPED_TEMPLATES,
    alter_template_name,
    build_prompts,
    expand,
    expand_counts,
    prompt_table,
    read_templates,
    text_for_similarity,
    trigger_text,
)
from lyco_trainer.data import Concept, discover


def reference_counts(n_prompts: int, n_images: int) -> list[int]:
    """Deal the N images to the prompts one by one, round robin (the first N prompts when there are more)."""
    used = min(n_prompts, n_images)
    counts = [0] * used
    for k in range(n_images):
        counts[k % used] += 1
    return counts


def concept(**kw: Any) -> Concept:
    base: dict[str, Any] = {"name": "c", "path": Path("."), "category": None, "class_name": "c", "subclass": None,
                            "trigger": "sks", "class_word": None}
    base.update(kw)
    return Concept(**base)


def write_dataset(root: Path) -> Path:
    """people/sohn man/{afro, realistic} (sub-class), stuffed_toy/lun stuffed toy, style/veli style, misc/waj."""
    spec = {
        "people/10_sohn man/afro, realistic": {"trigger": "sohn", "class_word": "man", "captions": ["smile", "hat"]},
        "stuffed_toy/10_lun stuffed toy": {"captions": ["on a table", None, "red, soft"]},
        "style/10_veli style": {"captions": ["a house"]},
        "misc/waj": {"captions": ["x"]},
    }
    for folder, info in spec.items():
        d = root / "data" / folder
        d.mkdir(parents=True)
        for i, cap in enumerate(info["captions"]):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i:02d}.png")
            if cap is not None:
                (d / f"{i:02d}.txt").write_text(cap)
        if "trigger" in info:
            (d / "concept.toml").write_text(f'trigger = "{info["trigger"]}"\nclass_word = "{info["class_word"]}"\n')
    return root / "data"


def cfg_for(root: Path, **prompts: Any) -> EvalConfig:
    return parse_config({"model": {"base": "base"}, "data": {"root": "data"}, "encoders": {"tiny": True},
                         "prompts": prompts}, "test", root)


# --------------------------------------------------------------------------------------------- expansion
@pytest.mark.parametrize(("n_prompts", "n_images"), [(1, 100), (3, 10), (10, 100), (5, 100), (7, 100), (150, 100),
                                                      (100, 100), (4, 4), (6, 4), (3, 1)])
def test_expansion_counts_and_consecutive_seeds(n_prompts: int, n_images: int) -> None:
    counts = expand_counts(n_prompts, n_images)
    assert counts == reference_counts(n_prompts, n_images)
    assert sum(counts) == n_images
    texts = [f"p{i}" for i in range(n_prompts)]
    lines = expand(texts, n_images, seed=1000)
    assert [t for t, _ in lines] == texts[: min(n_prompts, n_images)]  # only the first N prompts when n > N
    flat = [s for _, seeds in lines for s in seeds]
    assert flat == list(range(1000, 1000 + n_images))  # image k ↔ seed 1000 + k, prompt blocks in order


def test_expansion_examples_from_the_paper() -> None:
    assert expand_counts(10, 100) == [10] * 10  # <alter>: 10 templates × 10
    assert expand_counts(5, 100) == [20] * 5  # <style>: 5 × 20
    assert expand_counts(1, 100) == [100]  # <trigger>
    assert expand_counts(7, 100) == [15, 15] + [14] * 5  # <train>: 100 // 7 = 14, the first 2 get 15
    assert expand(["a", "b", "c"], 4, 7) == [("a", [7, 8]), ("b", [9]), ("c", [10])]
    with pytest.raises(InvalidConfigError, match="n_images"):
        expand_counts(3, 0)


# --------------------------------------------------------------------------------------------- descriptors
def test_trigger_text_and_subclass() -> None:
    cfg = cfg_for(Path("/x")).prompts
    assert trigger_text(concept(trigger="lun", class_word="stuffed toy"), cfg) == "lun stuffed toy"
    sub = concept(trigger="fck", class_word="man", subclass="afro, realistic")
    assert trigger_text(sub, cfg) == "fck man, afro, realistic"
    assert trigger_text(concept(trigger="casual", subclass="casual"), cfg) == "casual"  # not repeated
    assert trigger_text(concept(trigger="a", subclass="b/c"), cfg) == "a, b, c"
    assert trigger_text(concept(trigger="", class_word=None, class_name="frieren"), cfg) == "frieren"
    off = cfg.model_copy(update={"subclass_in_trigger": False})
    assert trigger_text(sub, off) == "fck man"


def test_text_for_similarity_cases_from_the_spec() -> None:
    cfg = cfg_for(Path("/x"), text_map={"lun": "lobster"}).prompts
    toy = concept(trigger="lun", class_word="stuffed toy")
    assert text_for_similarity("lun stuffed toy on the moon", toy, cfg) == "lobster stuffed toy on the moon"
    # token-aware: "lunch" is not the trigger (the official substring replace would turn it into "lobsterch")
    assert text_for_similarity("lun stuffed toy at lunch", toy, cfg) == "lobster stuffed toy at lunch"
    man = concept(trigger="sohn", class_word="man", subclass="afro, realistic")
    assert text_for_similarity("sohn man, afro, realistic", man, cfg) == "man, afro, realistic"
    assert text_for_similarity("Sohn man, , smile ,", man, cfg) == "man, smile"
    style = concept(trigger="veli", class_word="style")
    assert text_for_similarity("veli style of a city skyline during sunset", style, cfg,
                               is_style=True) == "a city skyline during sunset"
    assert text_for_similarity("veli style", style, cfg, is_style=True) == ""
    # a mapped multi-word phrase (an outfit tag) is removed whole
    cfg2 = cfg_for(Path("/x"), text_map={"toid outfit": ""}).prompts
    girl = concept(trigger="whoo", class_word="anime girl")
    assert text_for_similarity("whoo anime girl, toid outfit, smile", girl, cfg2) == "anime girl, smile"


# --------------------------------------------------------------------------------------------- templates
def test_shipped_templates_are_valid() -> None:
    names = sorted(p.stem for p in (SHIPPED_TEMPLATES / "alter").glob("*.txt"))
    assert names == ["character", "generic", "object", "scene", "style"]
    for name in names:
        lines = read_templates(SHIPPED_TEMPLATES / "alter" / f"{name}.txt", placeholder=True)
        assert len(lines) == 10  # the paper: 10 <alter> prompts per category
        assert len(set(lines)) == 10
    style = read_templates(SHIPPED_TEMPLATES / "style.txt", placeholder=True)
    assert len(style) == 5
    assert [s.split("style of ")[1] for s in style] == ["a pencil drawing", "a watercolor painting",
                                                        "Vincent van Gogh", "Claude Monet", "pixel art"]
    agn = read_templates(SHIPPED_TEMPLATES / "agnostic.txt", placeholder=False)
    assert len(agn) == 10
    assert all("{}" not in a for a in agn)


def test_category_to_template() -> None:
    cfg = cfg_for(Path("/x"), categories={"plush": "object"}).prompts
    assert alter_template_name("people", cfg) == "character"
    assert alter_template_name("anime", cfg) == "character"
    assert alter_template_name("stuffed_toy", cfg) == "object"
    assert alter_template_name("Stuffed Toy", cfg) == "object"
    assert alter_template_name("scene", cfg) == "scene"
    assert alter_template_name("style", cfg) == "style"
    assert alter_template_name("plush", cfg) == "object"
    assert alter_template_name("food", cfg) == "generic"
    assert alter_template_name(None, cfg) == "generic"


# --------------------------------------------------------------------------------------------- every type
def test_build_prompts_every_type(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    cfg = cfg_for(tmp_path, n_images=4, types=["train", "trigger", "alter", "style", "agnostic", "agnostic_class"])
    specs = build_prompts(cfg.data, cfg)
    got: dict[tuple[str, str], list[Any]] = {}
    for p in specs:
        got.setdefault((p.concept, p.prompt_type), []).append(p)
    # concept names are the folder paths below data.root
    man, toy, style, misc = ("people/10_sohn man/afro, realistic", "stuffed_toy/10_lun stuffed toy",
                             "style/10_veli style", "misc/waj")
    # every (concept, type) set has N images with seeds 1000.., paired by first_image
    for (_c, _t), ps in got.items():
        assert [s for p in ps for s in p.seeds] == [1000, 1001, 1002, 1003]
        assert [p.first_image for p in ps] == [sum(q.n_images for q in ps[:i]) for i in range(len(ps))]
        assert [p.index for p in ps] == list(range(len(ps)))
    # train: the training captions (descriptor + tags; an image without a caption file gets the descriptor)
    assert [(p.text, p.n_images) for p in got[(toy, "train")]] == [
        ("lun stuffed toy, on a table", 2), ("lun stuffed toy", 1), ("lun stuffed toy, red, soft", 1)]
    assert [p.text for p in got[(man, "train")]] == ["sohn man, smile", "sohn man, hat"]
    # trigger: descriptor (+ sub-class), one prompt with all N images
    assert [(p.text, p.n_images) for p in got[(man, "trigger")]] == [("sohn man, afro, realistic", 4)]
    assert [p.text for p in got[(misc, "trigger")]] == ["waj"]
    # alter: the category's templates, filled with the descriptor; the first N of 10 templates, one image each
    toy_templates = read_templates(SHIPPED_TEMPLATES / "alter" / "object.txt", placeholder=True)
    assert [p.text for p in got[(toy, "alter")]] == [t.replace("{}", "lun stuffed toy") for t in toy_templates[:4]]
    assert [p.template for p in got[(toy, "alter")]] == toy_templates[:4]
    man_templates = read_templates(SHIPPED_TEMPLATES / "alter" / "character.txt", placeholder=True)
    assert got[(man, "alter")][0].text == man_templates[0].replace("{}", "sohn man, afro, realistic")
    assert got[(misc, "alter")][0].template == read_templates(SHIPPED_TEMPLATES / "alter" / "generic.txt",
                                                              placeholder=True)[0]
    # style: not for the style category
    assert got[(toy, "style")][0].text == "lun stuffed toy in the style of a pencil drawing"
    assert (style, "style") not in got
    assert got[(style, "alter")][0].clip_text.startswith("a city skyline")  # "veli style of a city …"
    # agnostic: neither trigger nor class word
    for c in (man, toy, style, misc):
        texts = [p.text for p in got[(c, "agnostic")]]
        assert texts == read_templates(SHIPPED_TEMPLATES / "agnostic.txt", placeholder=False)[:4]
    # agnostic_class: the class word in the alter templates, no trigger; no class word → none
    assert [p.text for p in got[(toy, "agnostic_class")]] == [t.replace("{}", "stuffed toy")
                                                              for t in toy_templates[:4]]
    assert all("sohn" not in p.text and p.text.startswith("man ") for p in got[(man, "agnostic_class")])
    assert (misc, "agnostic_class") not in got
    # CLIP texts: the trigger removed (not mapped here)
    assert got[(man, "trigger")][0].clip_text == "man, afro, realistic"
    assert all("lun" not in p.clip_text.split() for p in specs if p.concept == toy)
    # the per-image table: N rows per set, image k with seed 1000 + k
    rows = [r for r in prompt_table(specs) if r["concept"] == toy and r["prompt_type"] == "train"]
    assert [(r["image"], r["seed"], r["prompt"]) for r in rows] == [
        (0, 1000, "lun stuffed toy, on a table"), (1, 1001, "lun stuffed toy, on a table"),
        (2, 1002, "lun stuffed toy"), (3, 1003, "lun stuffed toy, red, soft")]


def test_style_for_styles_and_sources(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    cfg = cfg_for(tmp_path, n_images=2, types=["style"], style_for_styles=True)
    ds = discover(cfg.data)
    specs = build_prompts(ds, cfg)
    assert {p.concept for p in specs} == {c.name for c in ds.concepts}
    assert build_prompts(list(ds.concepts), cfg) == specs  # concepts alone do for template types
    with pytest.raises(InvalidConfigError, match="'train' needs the dataset"):
        build_prompts(list(ds.concepts), cfg_for(tmp_path, types=["train"]))


def test_template_folder_override(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    mine = tmp_path / "mine"
    (mine / "alter").mkdir(parents=True)
    (mine / "alter" / "object.txt").write_text("# my toys\n\n{} on a red carpet\n{} next to {} \n")
    (mine / "alter" / "food.txt").write_text("{} on a plate\n")
    cfg = cfg_for(tmp_path, templates="mine", n_images=3, types=["alter", "style"])
    assert cfg.prompts.templates == mine  # relative to the config's folder
    specs = [p for p in build_prompts(cfg.data, cfg) if p.concept == "stuffed_toy/10_lun stuffed toy"]
    assert [(p.prompt_type, p.text, p.n_images) for p in specs[:2]] == [
        ("alter", "lun stuffed toy on a red carpet", 2), ("alter", "lun stuffed toy next to lun stuffed toy", 1)]
    assert specs[2].text.endswith("in the style of a pencil drawing")  # style.txt: not in mine → shipped
    assert alter_template_name("food", cfg.prompts) == "food"  # a file named after the category is used
    (mine / "style.txt").write_text("{} in the style of x\nno placeholder here\n")
    with pytest.raises(InvalidConfigError, match=r"style\.txt:2: template has no \{\}"):
        build_prompts(cfg.data, cfg)
    (mine / "style.txt").write_text("# only comments\n")
    with pytest.raises(InvalidConfigError, match="no templates"):
        build_prompts(cfg.data, cfg)
    cfg_missing = cfg_for(tmp_path, templates="mine", categories={"stuffed_toy": "nope"}, types=["alter"])
    with pytest.raises(NotFoundError, match=r"alter/nope\.txt"):
        build_prompts(cfg_missing.data, cfg_missing)


# --------------------------------------------------------------------------------------------- config
CONFIG = """
[model]
base = "models/sd"
[[checkpoints]]
path = "runs"
name = "lokr"
lr_level = 2
[[checkpoints]]
path = "one.safetensors"
strengths = [0.5, 1.0]
algo = "loha"
[data]
root = "data"
resolution = 768
[prompts]
n_images = 100
[encoders]
dinov2 = "w/dino"
clip = "w/clip"
vgg19 = "w/vgg19.pth"
[output]
dir = "results"
"""


def _adapter(path: Path, epochs: int | None = None) -> None:
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
    net = lc.create_network(lin, algo="lora", dim=2, preset="full")
    meta = None
    if epochs is not None:
        from lyco_core.formats.metadata import AdapterMetadata, TrainingInfo

        meta = AdapterMetadata(training=TrainingInfo(epochs=epochs))
    lc.save_adapter(net, path, metadata=meta)


def test_config_file_paths_overrides_and_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "cfg.toml").write_text(CONFIG)
    (tmp_path / "runs").mkdir()
    _adapter(tmp_path / "runs" / "x-000010.safetensors")
    _adapter(tmp_path / "runs" / "x-000030.safetensors", epochs=31)
    _adapter(tmp_path / "one.safetensors")
    cfg = load_config(tmp_path / "cfg.toml", ["generation.steps=10", "prompts.types=[\"trigger\"]"])
    assert cfg.model.base == tmp_path / "models" / "sd"
    assert cfg.data.root == tmp_path / "data"
    assert cfg.encoders.vgg19 == tmp_path / "w" / "vgg19.pth"
    assert cfg.output.dir == tmp_path / "results"
    assert (cfg.generation.steps, cfg.generation.guidance, cfg.generation.scheduler) == (10, 7.0, "ddim")
    assert (cfg.generation.width, cfg.generation.seed) == (512, 1000)
    assert cfg.prompts.types == ["trigger"]
    assert cfg.prompts.n_images == 100
    cks = expand_checkpoints(cfg)
    assert [(c.id, c.strength, c.algo, c.epoch, c.lr_level) for c in cks] == [
        ("lokr-x-000010", 1.0, "lora", 10, 2),  # epoch from the file name, algo from the file's metadata
        ("lokr-x-000030", 1.0, "lora", 31, 2),  # the metadata's epoch wins over the name
        ("one@0.5", 0.5, "loha", None, None),  # the config's algo wins over the metadata
        ("one@1", 1.0, "loha", None, None),
    ]
    assert cks[0].factors()["lr_level"] == 2


@pytest.mark.parametrize(("doc_change", "message"), [
    ({"generation": {"stpes": 3}}, "unknown key 'generation.stpes'"),
    ({"prompts": {"types": ["bogus"]}}, "prompts.types.0"),
    ({"prompts": {"n_images": 0}}, "prompts.n_images"),
    ({"generation": {"width": 500}}, "generation.width: 500 is not a multiple of 8"),
    ({"checkpoints": [{"path": "a", "name": "base"}]}, "checkpoints.0.name"),
    ({"encoders": {"tiny": False, "clip": "c", "vgg19": "v"}}, "encoders.dinov2 is needed by metric"),
    ({"model": None}, "missing key 'model'"),
])
def test_config_errors_name_the_key(doc_change: dict[str, Any], message: str) -> None:
    doc: dict[str, Any] = {"model": {"base": "b"}, "data": {"root": "d"}, "encoders": {"tiny": True}}
    for k, v in doc_change.items():
        if v is None:
            doc.pop(k)
        elif isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    with pytest.raises(InvalidConfigError, match=message) as err:
        parse_config(doc, "eval.toml")
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("eval.toml: ")


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(InvalidConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "ok.toml").write_text('[model]\nbase = "b"\n[data]\nroot = "d"\n[encoders]\ntiny = true\n')
    with pytest.raises(InvalidConfigError, match="--set 'steps': expected key=value"):
        load_config(tmp_path / "ok.toml", ["steps"])
    cfg = load_config(tmp_path / "ok.toml", ["checkpoints=[{path = \"missing.safetensors\"}]"])
    with pytest.raises(NotFoundError, match=r"checkpoints\[0\].path: no such file"):
        expand_checkpoints(cfg)
    (tmp_path / "empty").mkdir()
    cfg = load_config(tmp_path / "ok.toml", ["checkpoints=[{path = \"empty\"}]"])
    with pytest.raises(NotFoundError, match=r"checkpoints\[0\].path: no .safetensors"):
        expand_checkpoints(cfg)
