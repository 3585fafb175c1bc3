"""The report's files: CSV/JSON tables (round trip, NaN handling), image grids (pixels), plots, HTML, atomic writes."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lyco_evaluator.aggregate import (
    CheckpointInfo,
    MetricRow,
    ShapResult,
    add_rank_scores,
    aggregate,
    criterion_scores,
    ranking_table,
    shap_feature_table,
)
from lyco_evaluator.report import (
    CSV_FIELDS,
    ConceptRef,
    EvalResult,
    ImageRef,
    beeswarm_plot,
    grid_columns,
    image_grid,
    scatter_plot,
    write_report,
    write_rows_csv,
)

COLOURS = {"base": (255, 0, 0), "a": (0, 255, 0), "b": (0, 0, 255)}


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _result(tmp: Path) -> EvalResult:
    rng = np.random.default_rng(0)
    concepts = [
        ConceptRef("toy/<lun>", "toy", "<lun>", None, "lun stuffed toy",
                   (_png(tmp / "data/0.png", (200, 200, 0), (20, 10)), _png(tmp / "data/1.png", (0, 200, 200)))),
        ConceptRef("scene/shld/day", "scene", "shld", "day", "shld scene", (_png(tmp / "data/2.png", (9, 9, 9)),)),
    ]
    rows: list[MetricRow] = []
    images: list[ImageRef] = []
    for ck in ("base", "a", "b"):
        for c in concepts:
            for metric, pt in (("image_similarity", "train"), ("image_similarity", "trigger"),
                               ("image_similarity", "alter"), ("scd", "trigger"), ("text_similarity", "alter"),
                               ("vendi", "trigger"), ("style_loss", "style")):
                if metric == "style_loss" and ck == "base":
                    continue
                rows.append(MetricRow(ck, c.name, c.category or "", c.class_name, c.subclass, pt, metric,
                                      float(rng.uniform(0.1, 1)), 2))
            for k, prompt in enumerate(["p one", "p two"]):
                for seed in (1000 + 2 * k, 1001 + 2 * k):
                    path = _png(tmp / "gen" / f"{ck}-{abs(hash(c.name))}-{seed}.png", COLOURS[ck])
                    images.append(ImageRef(ck, c.name, "alter", prompt, seed, path))
    rows.append(MetricRow("a", concepts[0].name, "toy", "<lun>", None, "train", "vendi", math.nan, 2))
    rows = add_rank_scores(rows)
    aggs = aggregate(rows)
    infos = [CheckpointInfo("a", algo="lora", epoch=1), CheckpointInfo("b", algo="loha", epoch=2)]
    scores = criterion_scores(aggs, ["a", "b"])
    return EvalResult(out_dir=tmp / "out", rows=rows, aggregates=aggs, checkpoints=infos, concepts=concepts,
                      images=images, scores=scores, ranking=ranking_table(scores),
                      settings={"steps": 2, "encoders": {"dinov2": "tiny"}}, warnings=["something <odd>"])


def test_tables_round_trip(tmp_path: Path) -> None:
    res = _result(tmp_path)
    write_report(res, html_report=False)
    with (tmp_path / "out/results.csv").open() as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(CSV_FIELDS)
    assert len(got) == len(res.rows)
    for r, g in zip(res.rows, got):
        if math.isnan(r.value):
            assert g["value"] == ""
            assert g["rank"] == ""
        else:
            assert float(g["value"]) == r.value  # full precision
        assert g["rank"] == ("" if r.rank is None or math.isnan(r.rank) else repr(r.rank))
        assert g["subclass"] == (r.subclass or "")
        assert g["criterion"] == r.criterion
    doc = json.loads((tmp_path / "out/results.json").read_text())  # strict JSON: NaN written as null
    nan_row = [d for d in doc["rows"] if d["metric"] == "vendi" and d["prompt_type"] == "train"]
    assert nan_row
    assert nan_row[0]["value"] is None
    assert nan_row[0]["rank"] is None
    assert doc["scores"] == res.scores
    assert doc["ranking"] == res.ranking
    assert len(doc["aggregates"]) == len(res.aggregates)
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporary files
    assert set(res.files) == {"csv", "json", "aggregates"}


def test_rewrite_replaces_files(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    write_rows_csv(p, [{"x": 1.5, "y": None}], ["x", "y"])
    write_rows_csv(p, [{"x": math.inf, "y": "z"}], ["x", "y"])
    assert p.read_text() == "x,y\n,z\n"


def test_grid_columns_round_robin() -> None:
    ims = [ImageRef("a", "c", "alter", p, s, Path("x")) for p, seeds in (("p1", [3, 1, 2]), ("p2", [5, 4]))
           for s in seeds]
    assert grid_columns(ims, 4) == [("p1", 1), ("p2", 4), ("p1", 2), ("p2", 5)]
    assert grid_columns(ims, 10)[-1] == ("p1", 3)
    assert len(grid_columns(ims, 10)) == 5


def test_image_grid_pixels(tmp_path: Path) -> None:
    red = _png(tmp_path / "r.png", (255, 0, 0), (8, 8))
    wide = _png(tmp_path / "w.png", (0, 0, 255), (20, 10))
    out = image_grid([("gen", [red, None], False), ("dataset", [wide], True)], tmp_path / "g.png", thumb=20)
    with Image.open(out) as g:
        g = g.convert("RGB")
        margin = g.width - 2 * (20 + 2)
        assert g.getpixel((margin + 10, 10)) == (255, 0, 0)  # squashed thumbnail
        assert g.getpixel((margin + 22 + 10, 10)) == (200, 200, 200)  # missing image
        # padded: 20×10 → 20×10 centred in 20×20, black above and below
        assert g.getpixel((margin + 10, 22 + 1)) == (0, 0, 0)
        assert g.getpixel((margin + 10, 22 + 10)) == (0, 0, 255)
    jpg = image_grid([("gen", [red], False)], tmp_path / "g.jpg", thumb=20)
    with Image.open(jpg) as j:
        assert j.format == "JPEG"


def test_plots(tmp_path: Path) -> None:
    res = _result(tmp_path)
    p = scatter_plot(res.aggregates, res.checkpoints, ("text_similarity", "alter"), ("image_similarity", "alter"),
                     "all", tmp_path / "s.png")
    assert p is not None
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert scatter_plot(res.aggregates, res.checkpoints, ("frechet", "train"), ("image_similarity", "alter"),
                        "all", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    feats = shap_feature_table(res.checkpoints)
    shap = ShapResult("vendi", "trigger", "all", feats, np.array([[0.1, -0.2, 0.0, 0.3, 0.05]] * 2), [0.4, 0.6])
    b = beeswarm_plot(shap, tmp_path / "b.png")
    with Image.open(b) as im:
        assert im.format == "PNG"
        assert im.width > 100


def test_html_report(tmp_path: Path) -> None:
    res = _result(tmp_path)
    res.shap = [ShapResult("vendi", "trigger", "all", shap_feature_table(res.checkpoints),
                           np.zeros((2, 5)), [0.0, 1.0])]
    write_report(res)
    out = tmp_path / "out"
    html = (out / "report.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", html)
    assert srcs
    assert all((out / s).is_file() for s in srcs)
    assert not any(s.startswith("/") for s in srcs)  # relative: the folder can be moved
    assert "grids/toy_lun-alter.jpg" in srcs
    assert "grids/toy_lun-dataset.jpg" in srcs
    assert "plots/scatter-all-0.png" in srcs
    assert "plots/scatter-toy-0.png" in srcs
    assert any(s.startswith("plots/shap-") for s in srcs)
    assert "&lt;lun&gt;" in html
    assert "<lun>" not in html
    assert "something &lt;odd&gt;" in html
    for crit in ("Fidelity", "Controllability", "Diversity", "Preservation"):
        assert f"<th class=l>{crit}</th>" in html
    # the alter grid: base, a, b rows (their colours) over 2 prompts × 2 seeds, then the dataset row
    with Image.open(out / "grids/toy_lun-alter.jpg") as g:
        g = g.convert("RGB")
        x = g.width - 4 * 130 + 64
        for row, ck in enumerate(("base", "a", "b")):
            px = np.array(g.getpixel((x, row * 130 + 64)))
            assert np.abs(px - np.array(COLOURS[ck])).max() < 40, (ck, px)
    lines = res.summary_lines()
    assert lines[0].startswith("evaluated 2 checkpoint(s) on 2 concept(s)")
    assert any(line.startswith("html: ") for line in lines)


@pytest.mark.parametrize("n", [1, 3])
def test_summary_json_is_plain(tmp_path: Path, n: int) -> None:
    res = _result(tmp_path)
    res.checkpoints = res.checkpoints[:n]
    assert json.loads(json.dumps(res.summary()))["checkpoints"] == [c.id for c in res.checkpoints]
