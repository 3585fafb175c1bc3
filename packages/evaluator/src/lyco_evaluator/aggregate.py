"""From per-concept metric values to the paper's figures and tables (evaluation.md §5, §6).

* :data:`METRICS` says which metric measures which criterion and in which direction; :data:`MAIN_COLUMNS` are
  the (metric, prompt type) pairs of the paper's main figures.
* :func:`add_rank_scores`: normalized rank scores across checkpoints, within each (concept, prompt type, metric)
  group: ``(rank - 1) / (n - 1)`` with average ranks for ties, ascending for similarities and Vendi, descending
  for distances (SCD, style loss, FD), so **1 is always best and 0 worst**.
* :func:`aggregate`: sub-classes are averaged into their class (no spread), then classes into their category and
  into ``all`` (mean, sample std, stderr = std/√count), for raw values and rank scores alike.
* :func:`select_best_step`: per training run, the step whose ranks have the highest harmonic mean (official code).
* :func:`criterion_scores` / :func:`ranking_table`: one score per criterion and checkpoint (mean normalized rank of
  the criterion's main columns), and the integer ranking like the paper's Table 1 (higher is better).
* :func:`shap_feature_table` / :func:`shap_analysis`: the paper's Figure 2 SHAP analysis (CatBoost over algorithm,
  preset, epoch, capacity, learning-rate level); ``shap`` and ``catboost`` are the optional extra
  ``lyco-evaluator[shap]`` and are imported only here, when asked for.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lyco_core.errors import InvalidConfigError

Criterion = Literal["fidelity", "controllability", "diversity", "preservation"]
CRITERIA: tuple[Criterion, ...] = ("fidelity", "controllability", "diversity", "preservation")
BASE_ID = "base"
NO_CATEGORY = "(none)"


@dataclass(frozen=True)
class MetricInfo:
    """A metric: its criterion, direction and the label the paper's figures use."""

    name: str
    label: str
    criterion: Criterion
    higher_is_better: bool


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("image_similarity", "Image Similarity", "fidelity", True),
        MetricInfo("scd", "Squared Centroid Distance", "fidelity", False),
        MetricInfo("frechet", "Fréchet Distance", "fidelity", False),
        MetricInfo("style_loss_dataset", "Style Loss (dataset)", "fidelity", False),
        MetricInfo("text_similarity", "Text Similarity", "controllability", True),
        MetricInfo("vendi", "Vendi", "diversity", True),
        MetricInfo("style_loss", "Style Loss (base model)", "preservation", False),
    )
}

#: The paper's main-figure columns (evaluation.md §5): criterion → (metric, prompt type) pairs whose mean
#: normalized rank is that criterion's score. SCD (trigger) is the alternative fidelity measure of the scatter plots.
MAIN_COLUMNS: dict[Criterion, tuple[tuple[str, str], ...]] = {
    "fidelity": (("image_similarity", "train"), ("image_similarity", "trigger"), ("image_similarity", "alter")),
    "controllability": (("text_similarity", "alter"),),
    "diversity": (("vendi", "trigger"),),
    "preservation": (("style_loss", "style"),),
}

#: The paper's scatter plots (x, y): (TextSim alter, ImageSim alter), (Vendi trigger, SCD trigger),
#: (Style loss style, ImageSim train), all in normalized ranks.
SCATTER_PAIRS: tuple[tuple[tuple[str, str], tuple[str, str], str], ...] = (
    (("text_similarity", "alter"), ("image_similarity", "alter"), "fidelity vs controllability"),
    (("vendi", "trigger"), ("scd", "trigger"), "fidelity (SCD) vs diversity"),
    (("style_loss", "style"), ("image_similarity", "train"), "fidelity vs base-model preservation"),
)


def metric_info(name: str) -> MetricInfo:
    """The :class:`MetricInfo` of ``name``; InvalidConfigError naming the known metrics otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise InvalidConfigError(f"unknown metric {name!r} (known: {', '.join(METRICS)})") from None


#: Concept-agnostic prompt types (no trigger word): what they measure is concept leak, i.e. preservation, and
#: fidelity metrics read reversed there (looking like the dataset without being asked to is a leak).
LEAK_TYPES = frozenset({"agnostic", "agnostic_class"})


def criterion_of(metric: str, prompt_type: str) -> Criterion:
    """The criterion a (metric, prompt type) column measures: the metric's, or preservation for agnostic prompts."""
    return "preservation" if prompt_type in LEAK_TYPES else metric_info(metric).criterion


def higher_is_better(metric: str, prompt_type: str) -> bool:
    """Direction of a column: the metric's, reversed for fidelity metrics on concept-agnostic prompts."""
    info = metric_info(metric)
    if prompt_type in LEAK_TYPES and info.criterion == "fidelity":
        return not info.higher_is_better
    return info.higher_is_better


def column_label(metric: str, prompt_type: str) -> str:
    """``"Image Similarity (alter)"``: a metric column as the figures name it."""
    return f"{metric_info(metric).label} ({prompt_type})"


@dataclass
class MetricRow:
    """One value: checkpoint × concept × prompt type × metric.

    ``value`` is the raw metric (NaN when it could not be computed); ``rank`` the normalized rank score in [0, 1]
    across checkpoints (None for the base model, which is a reference and not ranked); ``n_images`` how many
    generated images went into the value.
    """

    checkpoint: str
    concept: str
    category: str
    class_name: str
    subclass: str | None
    prompt_type: str
    metric: str
    value: float
    n_images: int = 0
    rank: float | None = None

    @property
    def criterion(self) -> Criterion:
        return criterion_of(self.metric, self.prompt_type)

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-able dict (criterion included; NaN value or rank becomes None)."""
        d = asdict(self)
        d["criterion"] = self.criterion
        d["value"] = _finite_or_none(self.value)
        d["rank"] = _finite_or_none(self.rank)
        return d


@dataclass
class AggregateRow:
    """A mean over concepts for one checkpoint × prompt type × metric at one level of the hierarchy.

    ``level`` is ``"class"`` (sub-classes averaged), ``"category"`` (classes averaged) or ``"all"`` (every class);
    ``group`` names the class (``category/class``), the category, or ``"all"``. ``std`` is the sample standard
    deviation over the ``count`` items averaged (0 for one item, and at the class level, as the official code
    keeps no spread there), ``stderr = std / √count``. ``rank_*`` are the same statistics of the rank scores
    (None for the base model).
    """

    checkpoint: str
    level: Literal["class", "category", "all"]
    group: str
    prompt_type: str
    metric: str
    mean: float
    std: float
    stderr: float
    count: int
    rank_mean: float | None = None
    rank_std: float | None = None
    rank_stderr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["criterion"] = criterion_of(self.metric, self.prompt_type)
        for k in ("mean", "std", "stderr", "rank_mean", "rank_std", "rank_stderr"):
            d[k] = _finite_or_none(d[k])
        return d


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


# --------------------------------------------------------------------------------------------- ranks
def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks in ascending order, ties sharing their average rank (pandas ``rank(method="average")``)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_scores(values: Sequence[float], higher_is_better: bool) -> list[float]:
    """Normalized rank scores: ``(rank - 1) / (n - 1)``, 1 for the best value and 0 for the worst.

    NaN values get NaN and are left out of ``n`` (pandas' ``na_option="keep"``). A group of one finite value
    scores 0.5: it is neither better nor worse than anything (the official formula would divide by zero).
    Example: [0.2, 0.5, 0.5, 0.9] → [0, 0.5, 0.5, 1] (similarity) or [1, 0.5, 0.5, 0] (distance).
    """
    idx = [i for i, v in enumerate(values) if math.isfinite(v)]
    out = [math.nan] * len(values)
    if not idx:
        return out
    keyed = [values[i] if higher_is_better else -values[i] for i in idx]
    ranks = average_ranks(keyed)
    n = len(idx)
    for i, r in zip(idx, ranks):
        out[i] = 0.5 if n == 1 else (r - 1) / (n - 1)
    return out


def add_rank_scores(rows: Iterable[MetricRow], *, exclude: Sequence[str] = (BASE_ID,)) -> list[MetricRow]:
    """Copies of ``rows`` with ``rank`` set, ranking the checkpoints within each (concept, prompt type, metric).

    Directions follow :func:`higher_is_better`. Rows of the checkpoints in ``exclude`` (the base model) keep
    ``rank=None``: the base is a reference.
    """
    out = [replace(r) for r in rows]
    groups: dict[tuple[str, str, str], list[MetricRow]] = defaultdict(list)
    for r in out:
        if r.checkpoint not in exclude:
            groups[(r.concept, r.prompt_type, r.metric)].append(r)
    for (_, pt, metric), members in groups.items():
        scores = rank_scores([m.value for m in members], higher_is_better(metric, pt))
        for m, s in zip(members, scores):
            m.rank = s
    return out


# --------------------------------------------------------------------------------------------- aggregation
def _stats(values: Sequence[float]) -> tuple[float, float, float, int]:
    """(mean, sample std, stderr, count) over the finite values; NaNs when there is none."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan, 0
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), std, std / math.sqrt(v.size), int(v.size)


def category_of(row: MetricRow) -> str:
    return row.category or NO_CATEGORY


def aggregate(rows: Iterable[MetricRow]) -> list[AggregateRow]:
    """Average ``rows`` (with ranks set) per class, then per category and over all classes.

    Class means average the class's concepts (its sub-classes, or the class folder itself) with no spread;
    category and ``all`` statistics are over class means. Rank statistics are computed alongside when the rows
    carry ranks.
    """
    by_class: dict[tuple[str, str, str, str, str], list[MetricRow]] = defaultdict(list)
    for r in rows:
        by_class[(r.checkpoint, r.prompt_type, r.metric, category_of(r), r.class_name)].append(r)
    out: list[AggregateRow] = []
    upper: dict[tuple[str, str, str, str], list[AggregateRow]] = defaultdict(list)
    for (ckpt, pt, metric, cat, cls), members in sorted(by_class.items()):
        mean, _, _, n = _stats([m.value for m in members])
        ranked = [m.rank for m in members if m.rank is not None]
        rmean = _stats(ranked)[0] if ranked else None
        row = AggregateRow(ckpt, "class", f"{cat}/{cls}", pt, metric, mean, 0.0, 0.0, n,
                           rmean, 0.0 if ranked else None, 0.0 if ranked else None)
        out.append(row)
        upper[(ckpt, pt, metric, cat)].append(row)
        upper[(ckpt, pt, metric, "\0all")].append(row)
    for (ckpt, pt, metric, cat), classes in sorted(upper.items()):
        mean, std, se, n = _stats([c.mean for c in classes])
        ranked = [c.rank_mean for c in classes if c.rank_mean is not None]
        rm, rs, rse = _stats(ranked)[:3] if ranked else (None, None, None)
        level: Literal["category", "all"] = "all" if cat == "\0all" else "category"
        out.append(AggregateRow(ckpt, level, "all" if level == "all" else cat, pt, metric, mean, std, se, n,
                                rm, rs, rse))
    return out


def find_aggregate(
    aggregates: Iterable[AggregateRow], checkpoint: str, metric: str, prompt_type: str, group: str = "all"
) -> AggregateRow | None:
    """The aggregate of ``checkpoint`` for (metric, prompt type) at ``group`` (a category name, or ``"all"``)."""
    for a in aggregates:
        if (a.checkpoint, a.metric, a.prompt_type, a.group) == (checkpoint, metric, prompt_type, group) and (
            a.level != "class"
        ):
            return a
    return None


def criterion_scores(
    aggregates: Sequence[AggregateRow], checkpoints: Sequence[str], group: str = "all"
) -> dict[str, dict[str, float | None]]:
    """criterion → checkpoint → mean normalized rank over the criterion's :data:`MAIN_COLUMNS` at ``group``.

    None where none of the criterion's columns was computed (e.g. preservation without ``style`` prompts).
    """
    index = {(a.checkpoint, a.metric, a.prompt_type): a for a in aggregates if a.group == group and a.level != "class"}
    out: dict[str, dict[str, float | None]] = {}
    for crit in CRITERIA:
        out[crit] = {}
        for ck in checkpoints:
            vals = [index[(ck, m, pt)].rank_mean for m, pt in MAIN_COLUMNS[crit] if (ck, m, pt) in index]
            finite = [v for v in vals if v is not None and math.isfinite(v)]
            out[crit][ck] = float(np.mean(finite)) if finite else None
    return out


def ranking_table(
    scores: Mapping[str, Mapping[str, float | None]], group_of: Callable[[str], str] | None = None
) -> dict[str, dict[str, float]]:
    """The paper's Table 1: criterion → column → rank (1 = worst … n = best, ties averaged).

    Columns are checkpoints, or the labels ``group_of(checkpoint)`` returns (e.g. the algorithm), whose scores
    are averaged first. Criteria with no score for any column are left out.
    """
    table: dict[str, dict[str, float]] = {}
    for crit, per_ck in scores.items():
        grouped: dict[str, list[float]] = defaultdict(list)
        for ck, s in per_ck.items():
            if s is not None and math.isfinite(s):
                grouped[group_of(ck) if group_of else ck].append(s)
        if not grouped:
            continue
        labels = list(grouped)
        ranks = average_ranks([float(np.mean(grouped[k])) for k in labels])
        table[crit] = dict(zip(labels, ranks))
    return table


# --------------------------------------------------------------------------------------------- checkpoints
@dataclass
class CheckpointInfo:
    """What is known about a checkpoint's training: the SHAP features and the plots' colours.

    ``algo`` is the network algorithm (``full``/``native`` both mean full fine-tuning), ``preset`` the trained
    layers, ``epoch`` the epochs done, ``dim`` / ``factor`` the capacity settings, ``lr`` the (UNet) learning rate.
    ``capacity`` / ``lr_level``, when given, are used as they are instead of being derived from dim/factor/lr.
    Unknown fields are None.
    """

    id: str
    label: str = ""
    algo: str | None = None
    preset: str | None = None
    epoch: int | None = None
    dim: int | None = None
    factor: int | None = None
    lr: float | None = None
    capacity: float | None = None
    lr_level: float | None = None
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoint_info_from_file(checkpoint_id: str, path: Path, label: str = "") -> CheckpointInfo:
    """Read algorithm, preset, epoch, dim, factor and learning rate from an adapter file's metadata.

    Lyco's own metadata is used first, then sd-scripts' ``ss_*`` keys; anything missing stays None.
    """
    import json

    from lyco_core.formats.metadata import read_metadata
    from lyco_core.formats.safetensors_io import read_header

    header = read_header(path)
    meta = read_metadata(header.metadata, source=str(path))
    info = CheckpointInfo(id=checkpoint_id, label=label or checkpoint_id, path=str(path))
    if meta.lyco is not None:
        net = meta.lyco.network
        info.algo, info.preset, info.dim = net.algo, net.preset, net.dim
        factor = net.options.get("factor")
        info.factor = int(factor) if isinstance(factor, int | float) and not isinstance(factor, bool) else None
        tr = meta.lyco.training
        if tr is not None:
            info.epoch = tr.epochs
            info.lr = tr.unet_lr if tr.unet_lr is not None else tr.learning_rate
    k = meta.kohya
    if info.epoch is None and k.get("ss_epoch", "").isdigit():
        info.epoch = int(k["ss_epoch"])
    if info.dim is None and k.get("ss_network_dim", "").isdigit():
        info.dim = int(k["ss_network_dim"])
    if info.lr is None:
        for key in ("ss_unet_lr", "ss_learning_rate"):
            try:
                info.lr = float(k[key])
                break
            except (KeyError, ValueError):
                continue
    if info.algo is None and "ss_network_args" in k:
        try:
            args = json.loads(k["ss_network_args"])
            info.algo = str(args.get("algo")) if isinstance(args, dict) and args.get("algo") else None
            if isinstance(args, dict) and args.get("preset"):
                info.preset = str(args["preset"])
        except ValueError:
            pass
    return info


# --------------------------------------------------------------------------------------------- best step
def run_key(info: CheckpointInfo) -> tuple[Any, ...]:
    """What makes checkpoints steps of one training run: ``extra["run"]`` when given, else every training setting
    but the epoch (algorithm, preset, dim, factor, lr, capacity, lr level)."""
    if "run" in info.extra:
        return ("run", str(info.extra["run"]))
    return (_algo(info), info.preset, info.dim, info.factor, info.lr, info.capacity, info.lr_level)


def harmonic_mean(values: Sequence[float]) -> float:
    """n / Σ 1/vᵢ of non-negative values; 0 when any value is 0 (NaN for none)."""
    if not values:
        return math.nan
    if any(v < 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"harmonic mean of {list(values)}: values must be finite and >= 0")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def select_best_step(
    infos: Sequence[CheckpointInfo],
    aggregates: Sequence[AggregateRow],
    columns: Sequence[tuple[str, str]],
    group: str = "all",
) -> dict[tuple[Any, ...], str]:
    """The official ``select_best_step``: per training run (:func:`run_key`), the checkpoint whose mean normalized
    ranks over ``columns`` (metric, prompt type) at ``group`` have the highest harmonic mean, so a step must do well
    on every column, not on one. Checkpoints missing a column are left out; ties go to the earliest epoch.
    Returns run key → checkpoint id.
    """
    best: dict[tuple[Any, ...], tuple[float, float, str]] = {}
    for info in infos:
        ranks = []
        for metric, pt in columns:
            a = find_aggregate(aggregates, info.id, metric, pt, group)
            if a is None or a.rank_mean is None or not math.isfinite(a.rank_mean):
                break
            ranks.append(a.rank_mean)
        else:
            score = harmonic_mean(ranks)
            epoch = float(info.epoch) if info.epoch is not None else math.inf
            key = run_key(info)
            held = best.get(key)
            if held is None or score > held[0] or (score == held[0] and epoch < held[1]):
                best[key] = (score, epoch, info.id)
    return {key: ck for key, (_s, _e, ck) in best.items()}


# --------------------------------------------------------------------------------------------- SHAP
SHAP_FEATURES = ("Algo", "Preset", "Step", "Capacity", "Lr Level")
#: The paper's capacity levels (evaluation.md §6): LoKr factor 12/8/4 → 1/2/3, LoRA dim 8/32 and LoHa dim 4/16
#: → 2/3, full fine-tuning → 4.
PAPER_CAPACITY: dict[tuple[str, str, int], int] = {
    ("lokr", "factor", 12): 1, ("lokr", "factor", 8): 2, ("lokr", "factor", 4): 3,
    ("lora", "dim", 8): 2, ("lora", "dim", 32): 3,
    ("loha", "dim", 4): 2, ("loha", "dim", 16): 3,
}
FULL_ALGOS = frozenset({"full", "native"})


def _algo(info: CheckpointInfo) -> str:
    a = (info.algo or "unknown").lower()
    return "full" if a in FULL_ALGOS else a


def _capacity_proxy(info: CheckpointInfo) -> tuple[str, float] | None:
    """("factor", -factor) for LoKr with a factor (smaller factor = more capacity), else ("dim", dim)."""
    if _algo(info) == "lokr" and info.factor is not None and info.factor > 0:
        return "factor", -float(info.factor)
    if info.dim is not None:
        return "dim", float(info.dim)
    return None


def capacity_levels(infos: Sequence[CheckpointInfo]) -> dict[str, float]:
    """checkpoint id → the paper's ordinal capacity (NaN when unknown).

    A capacity given on the checkpoint wins. Values in :data:`PAPER_CAPACITY` use the paper's levels; full
    fine-tuning is 4; any other setting gets its 1-based position among the distinct settings of its algorithm
    (more parameters = higher).
    """
    distinct: dict[str, set[float]] = defaultdict(set)
    for i in infos:
        p = _capacity_proxy(i)
        if p is not None:
            distinct[_algo(i)].add(p[1])
    out: dict[str, float] = {}
    for i in infos:
        algo = _algo(i)
        if i.capacity is not None or algo == "full":
            out[i.id] = float(i.capacity) if i.capacity is not None else 4.0
            continue
        p = _capacity_proxy(i)
        if p is None:
            out[i.id] = math.nan
            continue
        kind, v = p
        paper = PAPER_CAPACITY.get((algo, kind, int(abs(v))))
        out[i.id] = float(paper) if paper is not None else float(sorted(distinct[algo]).index(v) + 1)
    return out


def lr_levels(infos: Sequence[CheckpointInfo]) -> dict[str, float]:
    """checkpoint id → learning-rate level: 1-based position of its lr among the distinct lrs of its kind.

    Full fine-tuning and adapters are two kinds (the paper: [1e-4, 5e-4, 1e-3] → 1-3 for adapters and
    [5e-7, 1e-6, 5e-6] → 1-3 for full fine-tuning). A level given on the checkpoint wins; NaN when the lr is
    unknown.
    """
    distinct: dict[bool, set[float]] = defaultdict(set)
    for i in infos:
        if i.lr is not None:
            distinct[_algo(i) == "full"].add(i.lr)
    out: dict[str, float] = {}
    for i in infos:
        if i.lr_level is not None:
            out[i.id] = float(i.lr_level)
        elif i.lr is None:
            out[i.id] = math.nan
        else:
            out[i.id] = float(sorted(distinct[_algo(i) == "full"]).index(i.lr) + 1)
    return out


def shap_feature_table(infos: Sequence[CheckpointInfo]) -> list[dict[str, Any]]:
    """One row per checkpoint: {"id", "Algo", "Preset", "Step", "Capacity", "Lr Level"} (see §6 of the spec).

    Algo and Preset are strings (categorical; "unknown" when missing); Step, Capacity and Lr Level are floats
    (NaN when missing, which CatBoost's ``nan_mode="Min"`` handles).
    """
    cap = capacity_levels(infos)
    lr = lr_levels(infos)
    return [
        {
            "id": i.id,
            "Algo": _algo(i),
            "Preset": i.preset or "unknown",
            "Step": float(i.epoch) if i.epoch is not None else math.nan,
            "Capacity": cap[i.id],
            "Lr Level": lr[i.id],
        }
        for i in infos
    ]


@dataclass
class ShapResult:
    """SHAP values of one target (a metric column's mean normalized rank at one group).

    ``features`` are the rows of :func:`shap_feature_table` (Capacity set to NaN for full fine-tuning, for
    display); ``values`` is (n_checkpoints, 5) in :data:`SHAP_FEATURES` order, with full fine-tuning's Capacity
    SHAP value folded into Algo, as the paper does; ``target`` the fitted values.
    """

    metric: str
    prompt_type: str
    group: str
    features: list[dict[str, Any]]
    values: np.ndarray
    target: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "prompt_type": self.prompt_type,
            "group": self.group,
            "features": [{k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in f.items()}
                         for f in self.features],
            "shap_values": [[_finite_or_none(float(x)) for x in row] for row in self.values],
            "target": [_finite_or_none(t) for t in self.target],
        }


def _import_shap() -> tuple[Any, Any]:
    try:
        import catboost
        import shap
    except ImportError as e:
        raise InvalidConfigError(
            f"the SHAP analysis needs the optional packages shap and catboost ({e.name} is missing): "
            "pip install 'lyco-evaluator[shap]', or turn the analysis off"
        ) from None
    return shap, catboost


def shap_analysis(
    infos: Sequence[CheckpointInfo],
    aggregates: Sequence[AggregateRow],
    columns: Sequence[tuple[str, str]] | None = None,
    group: str = "all",
) -> list[ShapResult]:
    """Fit ``CatBoostRegressor(iterations=300, learning_rate=0.1, random_seed=123, nan_mode="Min")`` per column
    (default: every main column) on all checkpoints, target = the column's mean normalized rank at ``group``, and
    explain it with ``shap.TreeExplainer`` (the paper's Figure 2). Needs ``lyco-evaluator[shap]``.
    """
    shap, catboost = _import_shap()
    columns = list(columns) if columns is not None else [c for cols in MAIN_COLUMNS.values() for c in cols]
    feats = shap_feature_table(infos)
    results: list[ShapResult] = []
    for metric, pt in columns:
        rows, target = [], []
        for f in feats:
            a = find_aggregate(aggregates, f["id"], metric, pt, group)
            if a is not None and a.rank_mean is not None and math.isfinite(a.rank_mean):
                rows.append(f)
                target.append(a.rank_mean)
        if len(rows) < 2:
            continue
        x = [[r[name] for name in SHAP_FEATURES] for r in rows]
        pool = catboost.Pool(x, target, cat_features=[0, 1], feature_names=list(SHAP_FEATURES))
        model = catboost.CatBoostRegressor(iterations=300, learning_rate=0.1, random_seed=123, nan_mode="Min",
                                           verbose=False, allow_writing_files=False)
        model.fit(pool)
        values = np.asarray(shap.TreeExplainer(model).shap_values(pool), dtype=np.float64)
        shown = [dict(r) for r in rows]
        for k, r in enumerate(shown):
            if r["Algo"] == "full":
                values[k, 0] += values[k, 3]
                values[k, 3] = 0.0
                r["Capacity"] = math.nan
        results.append(ShapResult(metric, pt, group, shown, values, target))
    return results
