"""Normalized ranks, hierarchical aggregation, criterion scores / Table 1 ranking and the SHAP feature table."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata

from lyco_core.errors import InvalidConfigError
from lyco_evaluator.aggregate import (
    MAIN_COLUMNS,
    SHAP_FEATURES,
    AggregateRow,
    CheckpointInfo,
    MetricRow,
    add_rank_scores,
    aggregate,
    average_ranks,
    criterion_of,
    criterion_scores,
    find_aggregate,
    harmonic_mean,
    higher_is_better,
    rank_scores,
    ranking_table,
    run_key,
    select_best_step,
    shap_analysis,
    shap_feature_table,
)
from lyco_evaluator.report import beeswarm_plot


def test_rank_scores_spec_vector() -> None:
    # evaluation.md §6: [0.2, 0.5, 0.5, 0.9] → [0, 0.5, 0.5, 1] (score) and [1, 0.5, 0.5, 0] (distance)
    assert rank_scores([0.2, 0.5, 0.5, 0.9], True) == [0.0, 0.5, 0.5, 1.0]
    assert rank_scores([0.2, 0.5, 0.5, 0.9], False) == [1.0, 0.5, 0.5, 0.0]


def test_average_ranks_match_scipy_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        v = rng.integers(0, 6, size=int(rng.integers(1, 15))).astype(float).tolist()
        np.testing.assert_allclose(average_ranks(v), rankdata(v, method="average"))
        n = len(v)
        if n > 1:
            expect = (rankdata(v, method="average") - 1) / (n - 1)
            np.testing.assert_allclose(rank_scores(v, True), expect)
            np.testing.assert_allclose(rank_scores(v, False), 1 - expect)


def test_rank_scores_nan_and_single() -> None:
    out = rank_scores([0.3, math.nan, 0.1], True)
    assert out[0] == 1.0
    assert out[2] == 0.0
    assert math.isnan(out[1])
    assert rank_scores([0.7], True) == [0.5]
    assert all(math.isnan(x) for x in rank_scores([math.nan, math.nan], False))


def _row(ck: str, concept: str, metric: str, pt: str, value: float, cat: str = "toy", cls: str = "c1",
         sub: str | None = None) -> MetricRow:
    return MetricRow(ck, concept, cat, cls, sub, pt, metric, value, n_images=4)


def test_add_rank_scores_groups_directions_and_base() -> None:
    rows = [
        _row("a", "x", "image_similarity", "train", 0.9),
        _row("b", "x", "image_similarity", "train", 0.5),
        _row("c", "x", "image_similarity", "train", 0.7),
        _row("base", "x", "image_similarity", "train", 0.99),  # not ranked: a reference
        _row("a", "x", "scd", "trigger", 0.1),  # distance: smallest is best
        _row("b", "x", "scd", "trigger", 0.3),
        _row("a", "y", "image_similarity", "train", 0.1),  # another concept: its own group
        _row("b", "y", "image_similarity", "train", 0.2),
        _row("a", "x", "image_similarity", "agnostic", 0.8),  # leak: looking like the dataset is bad
        _row("b", "x", "image_similarity", "agnostic", 0.2),
    ]
    ranked = {(r.checkpoint, r.concept, r.metric, r.prompt_type): r.rank for r in add_rank_scores(rows)}
    assert ranked[("a", "x", "image_similarity", "train")] == 1.0
    assert ranked[("c", "x", "image_similarity", "train")] == 0.5
    assert ranked[("b", "x", "image_similarity", "train")] == 0.0
    assert ranked[("base", "x", "image_similarity", "train")] is None
    assert ranked[("a", "x", "scd", "trigger")] == 1.0
    assert ranked[("b", "x", "scd", "trigger")] == 0.0
    assert ranked[("b", "y", "image_similarity", "train")] == 1.0
    assert ranked[("a", "x", "image_similarity", "agnostic")] == 0.0
    assert rows[0].rank is None  # the input is not modified
    assert higher_is_better("style_loss", "style") is False
    assert higher_is_better("vendi", "trigger") is True
    assert criterion_of("image_similarity", "agnostic_class") == "preservation"
    assert criterion_of("text_similarity", "alter") == "controllability"
    with pytest.raises(InvalidConfigError, match="unknown metric 'fid'"):
        higher_is_better("fid", "train")


def test_aggregate_subclass_class_category_all() -> None:
    # category toy: class c1 with sub-classes s1, s2; class c2 (no sub-class); category scene: class c3
    vals = {("toy", "c1", "s1"): 0.2, ("toy", "c1", "s2"): 0.6, ("toy", "c2", None): 0.9, ("scene", "c3", None): 0.5}
    rows = []
    for (cat, cls, sub), v in vals.items():
        concept = f"{cat}/{cls}" + (f"/{sub}" if sub else "")
        rows.append(_row("a", concept, "vendi", "trigger", v, cat, cls, sub))
        rows.append(_row("b", concept, "vendi", "trigger", v / 2, cat, cls, sub))
    aggs = aggregate(add_rank_scores(rows))
    cls_mean = {a.group: a.mean for a in aggs if a.level == "class" and a.checkpoint == "a"}
    assert cls_mean == pytest.approx({"toy/c1": 0.4, "toy/c2": 0.9, "scene/c3": 0.5})
    toy = find_aggregate(aggs, "a", "vendi", "trigger", "toy")
    assert toy is not None
    assert toy.level == "category"
    assert toy.count == 2
    assert toy.mean == pytest.approx(0.65)
    assert toy.std == pytest.approx(np.std([0.4, 0.9], ddof=1))
    assert toy.stderr == pytest.approx(np.std([0.4, 0.9], ddof=1) / math.sqrt(2))
    everything = find_aggregate(aggs, "a", "vendi", "trigger")
    assert everything is not None
    assert everything.level == "all"
    assert everything.count == 3
    assert everything.mean == pytest.approx(np.mean([0.4, 0.9, 0.5]))
    assert everything.stderr == pytest.approx(np.std([0.4, 0.9, 0.5], ddof=1) / math.sqrt(3))
    # a is better than b on every concept: rank 1 everywhere, b 0, with no spread
    assert everything.rank_mean == 1.0
    assert everything.rank_std == 0.0
    scene = find_aggregate(aggs, "b", "vendi", "trigger", "scene")
    assert scene is not None
    assert scene.count == 1
    assert scene.std == 0.0
    assert scene.rank_mean == 0.0


def _agg(ck: str, metric: str, pt: str, rank: float, group: str = "all") -> AggregateRow:
    return AggregateRow(ck, "all" if group == "all" else "category", group, pt, metric, 0.0, 0.0, 0.0, 3,
                        rank, 0.0, 0.0)


def test_criterion_scores_and_ranking_table() -> None:
    aggs = [
        _agg("a", "image_similarity", "train", 1.0), _agg("a", "image_similarity", "trigger", 0.5),
        _agg("a", "image_similarity", "alter", 0.0), _agg("a", "text_similarity", "alter", 0.2),
        _agg("a", "vendi", "trigger", 0.9),
        _agg("b", "image_similarity", "train", 0.0), _agg("b", "image_similarity", "trigger", 0.0),
        _agg("b", "image_similarity", "alter", 0.3), _agg("b", "text_similarity", "alter", 0.8),
        _agg("b", "vendi", "trigger", 0.9),
        _agg("c", "image_similarity", "train", 0.9), _agg("c", "text_similarity", "alter", 0.5),
        _agg("c", "vendi", "trigger", 0.1),
        _agg("a", "text_similarity", "alter", 0.0, group="toy"),  # other group: ignored for "all"
    ]
    scores = criterion_scores(aggs, ["a", "b", "c"])
    assert scores["fidelity"] == pytest.approx({"a": 0.5, "b": 0.1, "c": 0.9})
    assert scores["controllability"] == pytest.approx({"a": 0.2, "b": 0.8, "c": 0.5})
    assert scores["preservation"] == {"a": None, "b": None, "c": None}
    assert len(MAIN_COLUMNS["fidelity"]) == 3
    table = ranking_table(scores)
    assert table["fidelity"] == {"a": 2.0, "b": 1.0, "c": 3.0}
    assert table["diversity"] == {"a": 2.5, "b": 2.5, "c": 1.0}  # ties share the average rank
    assert "preservation" not in table
    by_algo = ranking_table(scores, {"a": "lora", "b": "lora", "c": "loha"}.__getitem__)
    assert by_algo["fidelity"] == {"lora": 1.0, "loha": 2.0}  # lora: mean(0.5, 0.1) = 0.3 < 0.9


def test_shap_feature_table_paper_levels() -> None:
    infos = [
        CheckpointInfo("k12", algo="lokr", preset="attn-only", epoch=10, factor=12, dim=10000, lr=1e-4),
        CheckpointInfo("k8", algo="lokr", preset="attn-mlp", epoch=30, factor=8, lr=5e-4),
        CheckpointInfo("k4", algo="lokr", preset="full", epoch=50, factor=4, lr=1e-3),
        CheckpointInfo("r8", algo="lora", preset="attn-mlp", epoch=10, dim=8, lr=1e-4),
        CheckpointInfo("r32", algo="lora", dim=32, lr=1e-3),
        CheckpointInfo("h4", algo="loha", dim=4, lr=5e-4),
        CheckpointInfo("h16", algo="loha", dim=16),
        CheckpointInfo("n1", algo="native", lr=5e-7),
        CheckpointInfo("n2", algo="full", lr=5e-6),
        CheckpointInfo("n3", algo="full", lr=1e-6),
        CheckpointInfo("g", algo="glora", dim=6, capacity=2.5, lr_level=7),
        CheckpointInfo("g2", algo="glora", dim=2),
    ]
    table = {r["id"]: r for r in shap_feature_table(infos)}
    cap = {k: v["Capacity"] for k, v in table.items()}
    assert cap["k12"] == 1
    assert cap["k8"] == 2
    assert cap["k4"] == 3
    assert cap["r8"] == 2
    assert cap["r32"] == 3
    assert cap["h4"] == 2
    assert cap["h16"] == 3
    assert cap["n1"] == cap["n2"] == 4
    assert cap["g"] == 2.5  # given: wins
    assert cap["g2"] == 1  # not in the paper's table: position among glora's dims (2 < 6)
    lr = {k: v["Lr Level"] for k, v in table.items()}
    assert (lr["k12"], lr["k8"], lr["k4"]) == (1, 2, 3)
    assert (lr["n1"], lr["n3"], lr["n2"]) == (1, 2, 3)  # full fine-tuning has its own lr scale
    assert lr["g"] == 7
    assert math.isnan(lr["h16"])
    assert table["n1"]["Algo"] == "full"
    assert table["k12"]["Preset"] == "attn-only"
    assert table["r32"]["Preset"] == "unknown"
    assert math.isnan(table["r32"]["Step"])
    assert table["k4"]["Step"] == 50.0


@pytest.mark.parametrize("missing", ["shap", "catboost"])
def test_shap_needs_the_extra(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    with pytest.raises(InvalidConfigError, match=r"lyco-evaluator\[shap\]"):
        shap_analysis([CheckpointInfo("a", algo="lora")], [])


def test_shap_analysis_attributes_the_rank_to_the_feature_that_drives_it(tmp_path: Path) -> None:
    """A real CatBoost + SHAP run (the evaluator's [shap] extra): the rank depends on the learning-rate level only,
    so that feature carries the SHAP values, increasing with the level; full fine-tuning's Capacity is folded into
    Algo; the beeswarm plot is written."""
    algos = [("lora", "dim", 8), ("lora", "dim", 32), ("loha", "dim", 4), ("lokr", "factor", 8)]
    infos, aggs = [], []
    for i in range(30):
        algo, kind, size = algos[i % 4]
        level = i % 3 + 1
        info = CheckpointInfo(f"c{i}", algo=algo, preset=["attn-only", "attn-mlp", "full"][(i // 3) % 3],
                              epoch=[10, 30, 50][(i // 9) % 3], lr=[1e-4, 5e-4, 1e-3][level - 1],
                              **{kind: size})
        infos.append(info)
    infos += [CheckpointInfo("f1", algo="full", preset="full", epoch=10, lr=5e-7),
              CheckpointInfo("f2", algo="full", preset="full", epoch=30, lr=5e-6)]
    levels = {r["id"]: r["Lr Level"] for r in shap_feature_table(infos)}
    for info in infos:
        rank = (levels[info.id] - 1) / 2
        aggs.append(AggregateRow(info.id, "all", "all", "train", "image_similarity", rank, 0.0, 0.0, 1,
                                 rank_mean=rank))
    (res,) = shap_analysis(infos, aggs, columns=[("image_similarity", "train")])
    assert res.values.shape == (32, 5)
    strength = np.abs(res.values).mean(axis=0)
    lr_col = SHAP_FEATURES.index("Lr Level")
    assert strength[lr_col] > 5 * max(s for k, s in enumerate(strength) if k != lr_col), strength
    by_level = {lv: res.values[[k for k, f in enumerate(res.features) if f["Lr Level"] == lv], lr_col].mean()
                for lv in (1.0, 2.0, 3.0)}
    assert by_level[1.0] < by_level[2.0] < by_level[3.0]
    # additivity: prediction = base + Σ SHAP, and the model fits these targets
    offset = res.values.sum(axis=1) - np.asarray(res.target)
    assert float(np.std(offset)) < 0.05
    full = [k for k, f in enumerate(res.features) if f["Algo"] == "full"]
    assert len(full) == 2
    assert all(res.values[k, SHAP_FEATURES.index("Capacity")] == 0.0 for k in full)
    assert all(math.isnan(res.features[k]["Capacity"]) for k in full)
    png = beeswarm_plot(res, tmp_path / "shap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000


def test_select_best_step_takes_the_highest_harmonic_mean_per_run() -> None:
    cols = [("image_similarity", "train"), ("text_similarity", "alter")]
    # run A: epoch 10 is best on one column only, epoch 30 is good on both (harmonic mean prefers it)
    ranks = {"a10": (1.0, 0.1), "a30": (0.6, 0.6), "a50": (0.5, 0.5),
             # run B (other lr): a zero on one column makes a step lose; 20 and 40 tie, the earlier wins
             "b10": (0.9, 0.0), "b20": (0.4, 0.8), "b40": (0.8, 0.4),
             # run C given by name: its steps differ in lr but are one run
             "c1": (0.2, 0.2), "c2": (0.3, 0.3)}
    infos = [CheckpointInfo(f"a{e}", algo="lora", preset="attn-mlp", dim=8, lr=1e-4, epoch=e) for e in (10, 30, 50)]
    infos += [CheckpointInfo(f"b{e}", algo="lora", preset="attn-mlp", dim=8, lr=1e-3, epoch=e) for e in (40, 20, 10)]
    infos += [CheckpointInfo("c1", algo="loha", lr=1e-4, epoch=1, extra={"run": "c"}),
              CheckpointInfo("c2", algo="loha", lr=5e-4, epoch=2, extra={"run": "c"}),
              CheckpointInfo("d1", algo="lokr", epoch=1)]  # no aggregates: left out
    aggs = [AggregateRow(ck, "all", "all", pt, metric, r, 0.0, 0.0, 1, rank_mean=r)
            for ck, pair in ranks.items() for (metric, pt), r in zip(cols, pair, strict=True)]
    best = select_best_step(infos, aggs, cols)
    assert best == {run_key(infos[0]): "a30", run_key(infos[3]): "b20", ("run", "c"): "c2"}
    assert harmonic_mean([0.6, 0.6]) == pytest.approx(0.6)
    assert harmonic_mean([1.0, 0.1]) == pytest.approx(2 / 11)
    assert harmonic_mean([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError, match="finite"):
        harmonic_mean([0.5, math.nan])
