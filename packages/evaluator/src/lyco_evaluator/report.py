"""Output of an evaluation: CSV/JSON tables and an HTML report with plots and image grids.

Files written into the output folder (each one atomically: a temporary file renamed into place):

* ``results.csv`` / ``results.json``: one row per checkpoint × concept × prompt type × metric (raw value, normalized
  rank score, the concept's category/class/sub-class, the criterion, the number of images); the JSON also holds the
  aggregates, the criterion scores, the ranking table, the checkpoints and the SHAP values.
* ``aggregates.csv``: the means per class / category / all, with std and stderr, for values and rank scores.
* ``report.html``: the ranking table (the paper's Table 1), criterion scores, the paper's scatter plots with error
  bars (``plots/*.png``), metric tables, image grids per concept and prompt type next to the dataset images
  (``grids/*.jpg``) and SHAP beeswarms when enabled. Images are referenced relatively, so the folder can be moved.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lyco_core.formats.safetensors_io import atomic_output

from .aggregate import (
    BASE_ID,
    CRITERIA,
    MAIN_COLUMNS,
    SCATTER_PAIRS,
    SHAP_FEATURES,
    AggregateRow,
    CheckpointInfo,
    MetricRow,
    ShapResult,
    column_label,
    higher_is_better,
)

METRIC_ORDER = ("image_similarity", "scd", "frechet", "style_loss_dataset", "text_similarity", "vendi", "style_loss")
PROMPT_TYPE_ORDER = ("train", "trigger", "alter", "style", "agnostic", "agnostic_class")
CSV_FIELDS = ("checkpoint", "category", "class_name", "subclass", "concept", "prompt_type", "metric", "criterion",
              "value", "rank", "n_images")
AGG_FIELDS = ("checkpoint", "level", "group", "prompt_type", "metric", "criterion", "mean", "std", "stderr", "count",
              "rank_mean", "rank_std", "rank_stderr")


@dataclass(frozen=True)
class ImageRef:
    """A generated image: which checkpoint (``"base"`` for the base model), concept, prompt type, prompt and seed."""

    checkpoint: str
    concept: str
    prompt_type: str
    prompt: str
    seed: int
    path: Path


@dataclass(frozen=True)
class ConceptRef:
    """A dataset concept as the report shows it: hierarchy, trigger and its images."""

    name: str
    category: str | None
    class_name: str
    subclass: str | None
    descriptor: str
    images: tuple[Path, ...] = ()


@dataclass
class EvalResult:
    """Everything an evaluation produced (see :func:`lyco_evaluator.runner.evaluate`).

    ``rows`` carry raw values and rank scores; ``aggregates`` the class/category/all statistics; ``scores``
    criterion → checkpoint → mean normalized rank (group ``all``); ``ranking`` the Table 1 ranks; ``files`` the
    written files by name (``csv``, ``json``, ``aggregates``, ``html``).
    """

    out_dir: Path
    rows: list[MetricRow]
    aggregates: list[AggregateRow]
    checkpoints: list[CheckpointInfo]
    concepts: list[ConceptRef] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    ranking: dict[str, dict[str, float]] = field(default_factory=dict)
    ranking_by_algo: dict[str, dict[str, float]] = field(default_factory=dict)
    shap: list[ShapResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary: files, checkpoints, criterion scores, ranking, counts, warnings."""
        return {
            "out_dir": str(self.out_dir),
            "files": {k: str(v) for k, v in self.files.items()},
            "checkpoints": [c.id for c in self.checkpoints],
            "concepts": [c.name for c in self.concepts],
            "rows": len(self.rows),
            "scores": self.scores,
            "ranking": self.ranking,
            "stats": self.stats,
            "warnings": self.warnings,
        }

    def summary_lines(self) -> list[str]:
        """Human-readable lines: the criterion scores per checkpoint and where the report is."""
        lines = [f"evaluated {len(self.checkpoints)} checkpoint(s) on {len(self.concepts)} concept(s): "
                 f"{len(self.rows)} metric values"]
        ids = [c.id for c in self.checkpoints]
        width = max([len(i) for i in ids] + [10])
        lines.append(f"{'checkpoint':<{width}}  " + "  ".join(f"{c:>15}" for c in CRITERIA))
        for ck in ids:
            cells = []
            for crit in CRITERIA:
                s = self.scores.get(crit, {}).get(ck)
                cells.append(f"{s:>15.3f}" if s is not None else f"{'-':>15}")
            lines.append(f"{ck:<{width}}  " + "  ".join(cells))
        lines.append("(mean normalized rank over concepts: 1 = best, 0 = worst)")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        for name in ("html", "csv", "json"):
            if name in self.files:
                lines.append(f"{name}: {self.files[name]}")
        return lines


# --------------------------------------------------------------------------------------------- atomic writes
def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (replacing an older report file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _fmt_csv(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else repr(v)
    return v


def write_rows_csv(path: Path, rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> Path:
    """A CSV with ``fields`` as the header; None and NaN become empty cells, floats keep full precision."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for r in rows:
        w.writerow([_fmt_csv(r.get(f)) for f in fields])
    return write_text(path, buf.getvalue())


def _jsonable(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (strict JSON has no NaN), containers recursed."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def result_json(result: EvalResult) -> dict[str, Any]:
    """The content of ``results.json`` (NaN written as null)."""
    return _jsonable({
        "format": "lyco-eval/1",
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "settings": result.settings,
        "checkpoints": [c.to_dict() for c in result.checkpoints],
        "concepts": [{"name": c.name, "category": c.category, "class_name": c.class_name, "subclass": c.subclass,
                      "descriptor": c.descriptor, "n_images": len(c.images)} for c in result.concepts],
        "rows": [r.to_dict() for r in result.rows],
        "aggregates": [a.to_dict() for a in result.aggregates],
        "scores": result.scores,
        "ranking": result.ranking,
        "ranking_by_algo": result.ranking_by_algo,
        "shap": [s.to_dict() for s in result.shap],
        "stats": result.stats,
        "warnings": result.warnings,
    })


def write_tables(result: EvalResult) -> dict[str, Path]:
    """Write ``results.csv``, ``aggregates.csv`` and ``results.json`` into ``result.out_dir``."""
    out = result.out_dir
    files = {
        "csv": write_rows_csv(out / "results.csv", (r.to_dict() for r in result.rows), CSV_FIELDS),
        "aggregates": write_rows_csv(out / "aggregates.csv", (a.to_dict() for a in result.aggregates), AGG_FIELDS),
        "json": write_text(out / "results.json",
                           json.dumps(result_json(result), indent=1, default=str, allow_nan=False) + "\n"),
    }
    result.files.update(files)
    return files


# --------------------------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return write_bytes(path, buf.getvalue())


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return s or "x"


def algo_of(infos: Mapping[str, CheckpointInfo], ck: str) -> str:
    i = infos.get(ck)
    return (i.algo if i is not None and i.algo else "unknown").lower()


def scatter_plot(
    aggregates: Sequence[AggregateRow],
    checkpoints: Sequence[CheckpointInfo],
    x: tuple[str, str],
    y: tuple[str, str],
    group: str,
    path: Path,
    title: str = "",
) -> Path | None:
    """One of the paper's scatter plots: normalized ranks of two columns, mean ± stderr over classes, one point
    per checkpoint, coloured by algorithm. None when no checkpoint has both columns at ``group``."""
    index = {(a.checkpoint, a.metric, a.prompt_type): a for a in aggregates if a.group == group and a.level != "class"}
    infos = {c.id: c for c in checkpoints}
    pts = []
    for c in checkpoints:
        ax_, ay_ = index.get((c.id, *x)), index.get((c.id, *y))
        if ax_ is None or ay_ is None or ax_.rank_mean is None or ay_.rank_mean is None:
            continue
        if not (math.isfinite(ax_.rank_mean) and math.isfinite(ay_.rank_mean)):
            continue
        pts.append((c.id, ax_.rank_mean, ay_.rank_mean, ax_.rank_stderr or 0.0, ay_.rank_stderr or 0.0))
    if not pts:
        return None
    plt = _pyplot()
    algos = sorted({algo_of(infos, p[0]) for p in pts})
    cmap = plt.get_cmap("tab10")
    colors = {a: cmap(i % 10) for i, a in enumerate(algos)}
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    for ck, px, py, ex, ey in pts:
        a = algo_of(infos, ck)
        ax.errorbar(px, py, xerr=ex, yerr=ey, fmt="o", color=colors[a], ecolor=colors[a], alpha=0.85,
                    capsize=2, markersize=5)
        if len(pts) <= 12:
            ax.annotate(infos[ck].label or ck, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for a in algos:
        ax.plot([], [], "o", color=colors[a], label=a)
    ax.legend(fontsize=7, loc="best", title="algorithm", title_fontsize=7)
    ax.set_xlabel(f"{column_label(*x)} — rank score", fontsize=8)
    ax.set_ylabel(f"{column_label(*y)} — rank score", fontsize=8)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title or group, fontsize=9)
    return _save_figure(fig, path)


def beeswarm_plot(res: ShapResult, path: Path) -> Path:
    """A SHAP beeswarm in the paper's style: one row per feature, SHAP value on x, points coloured by the feature
    value (low → high; categorical features by category), vertical jitter where points pile up."""
    plt = _pyplot()
    n_feat = len(SHAP_FEATURES)
    fig, ax = plt.subplots(figsize=(5.5, 0.55 * n_feat + 1.2))
    rng = np.random.default_rng(0)
    cmap = plt.get_cmap("coolwarm")
    for k, name in enumerate(SHAP_FEATURES):
        vals = res.values[:, k]
        raw = [f[name] for f in res.features]
        if name in ("Algo", "Preset"):
            cats = sorted({str(v) for v in raw})
            col = [cats.index(str(v)) / max(len(cats) - 1, 1) for v in raw]
        else:
            finite = [float(v) for v in raw if isinstance(v, float | int) and math.isfinite(v)]
            lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
            col = [(float(v) - lo) / (hi - lo) if isinstance(v, float | int) and math.isfinite(v) and hi > lo
                   else 0.5 for v in raw]
        yy = n_feat - 1 - k + rng.uniform(-0.25, 0.25, size=len(vals))
        ax.scatter(vals, yy, c=[cmap(c) for c in col], s=14, alpha=0.85, edgecolors="none")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(n_feat))
    ax.set_yticklabels(list(reversed(SHAP_FEATURES)), fontsize=8)
    ax.set_xlabel("SHAP value (impact on the normalized rank)", fontsize=8)
    ax.set_title(f"{column_label(res.metric, res.prompt_type)} — {res.group}", fontsize=9)
    return _save_figure(fig, path)


# --------------------------------------------------------------------------------------------- image grids
def _thumb(path: Path, size: int, pad: bool) -> Any:
    """A ``size``×``size`` RGB thumbnail: squashed (generated images) or padded with black (dataset images)."""
    from PIL import Image

    with Image.open(path) as src:
        im = src.convert("RGB")
    if not pad:
        return im.resize((size, size), Image.Resampling.BICUBIC)
    w, h = im.size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(im.resize((nw, nh), Image.Resampling.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def image_grid(rows: Sequence[tuple[str, Sequence[Path | None], bool]], path: Path, thumb: int = 128) -> Path:
    """Compose a grid image: one row per (label, images, pad) with the label drawn in a left margin.

    Missing images (None) leave a grey cell; rows may have different lengths. Saved as JPEG (quality 90) when
    ``path`` ends in ``.jpg``, else PNG.
    """
    from PIL import Image, ImageDraw

    n_cols = max((len(r[1]) for r in rows), default=1) or 1
    margin, gap = 110, 2
    grid = Image.new("RGB", (margin + n_cols * (thumb + gap), len(rows) * (thumb + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (label, images, pad) in enumerate(rows):
        y = i * (thumb + gap)
        text = label if len(label) <= 16 else label[:15] + "…"
        draw.text((4, y + thumb // 2 - 6), text, fill=(0, 0, 0))
        for j, p in enumerate(images):
            x = margin + j * (thumb + gap)
            if p is None:
                draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=(200, 200, 200))
            else:
                grid.paste(_thumb(p, thumb, pad), (x, y))
    buf = io.BytesIO()
    if path.suffix.lower() in (".jpg", ".jpeg"):
        grid.save(buf, format="JPEG", quality=90)
    else:
        grid.save(buf, format="PNG", optimize=True)
    return write_bytes(path, buf.getvalue())


def grid_columns(images: Sequence[ImageRef], n: int) -> list[tuple[str, int]]:
    """The (prompt, seed) keys of a grid's columns: the first seed of each prompt, then the second, … (round
    robin, so that every prompt is shown before any prompt is repeated), at most ``n``."""
    per_prompt: dict[str, list[int]] = defaultdict(list)
    for im in images:
        if im.seed not in per_prompt[im.prompt]:
            per_prompt[im.prompt].append(im.seed)
    for seeds in per_prompt.values():
        seeds.sort()
    keys: list[tuple[str, int]] = []
    depth = 0
    while len(keys) < n and any(len(s) > depth for s in per_prompt.values()):
        for prompt, seeds in per_prompt.items():
            if len(seeds) > depth and len(keys) < n:
                keys.append((prompt, seeds[depth]))
        depth += 1
    return keys


# --------------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;color:#222;
padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:8px 0;font-size:.88em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}.best{background:#d9f2d9;font-weight:600}.worst{background:#f8dcdc}
.muted{color:#777}.plots img{max-width:32%;margin:4px;border:1px solid #eee}
.grid img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
ol.prompts{font-size:.8em;color:#555}.warn{color:#a40}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_uri()


def _ranking_html(table: Mapping[str, Mapping[str, float]], caption: str) -> str:
    if not table:
        return "<p class=muted>no ranking (no criterion could be scored)</p>"
    cols: list[str] = []
    for per in table.values():
        cols += [c for c in per if c not in cols]
    out = [f"<table><caption>{_e(caption)}</caption><tr><th class=l></th>"]
    out += [f"<th>{_e(c)}</th>" for c in cols] + ["</tr>"]
    for crit in CRITERIA:
        if crit not in table:
            continue
        per = table[crit]
        hi, lo = max(per.values()), min(per.values())
        out.append(f"<tr><th class=l>{_e(crit.capitalize())}</th>")
        for c in cols:
            v = per.get(c)
            cls = " class=best" if v == hi and hi != lo else " class=worst" if v == lo and hi != lo else ""
            out.append(f"<td{cls}>{'–' if v is None else f'{v:g}'}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _scores_html(scores: Mapping[str, Mapping[str, float | None]], ids: Sequence[str]) -> str:
    out = ["<table><tr><th class=l>checkpoint</th>"]
    out += [f"<th>{_e(c)}<br><span class=muted>"
            f"{_e(', '.join(column_label(m, p) for m, p in MAIN_COLUMNS[c]))}</span></th>" for c in CRITERIA]
    out.append("</tr>")
    for ck in ids:
        out.append(f"<tr><td class=l>{_e(ck)}</td>")
        out += [f"<td>{_num(scores.get(c, {}).get(ck))}</td>" for c in CRITERIA]
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _columns(aggs: Iterable[AggregateRow]) -> list[tuple[str, str]]:
    return _sort_columns({(a.metric, a.prompt_type) for a in aggs})


def _sort_columns(cols: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    order = {m: i for i, m in enumerate(METRIC_ORDER)}
    return sorted(cols, key=lambda c: (order.get(c[0], len(order)), _pt_order(c[1]), c))


def _pt_order(pt: str) -> int:
    return PROMPT_TYPE_ORDER.index(pt) if pt in PROMPT_TYPE_ORDER else len(PROMPT_TYPE_ORDER)


def _checkpoint_table_html(
    ids: Sequence[str],
    cols: Sequence[tuple[str, str]],
    cell: Callable[[str, str, str], str | None],
    arrows: bool = False,
) -> str:
    """A row per checkpoint, a column per (metric, prompt type); ``cell(checkpoint, metric, prompt_type)`` gives a
    cell's HTML (None: "–"). ``arrows``: mark each column ↑ or ↓ (which way is better)."""
    out = ["<table><tr><th class=l>checkpoint</th>"]
    for m, p in cols:
        arrow = (" ↑" if higher_is_better(m, p) else " ↓") if arrows else ""
        out.append(f"<th>{_e(column_label(m, p))}{arrow}</th>")
    out.append("</tr>")
    for ck in ids:
        out.append(f"<tr><td class=l>{_e(ck)}</td>")
        for m, p in cols:
            html = cell(ck, m, p)
            out.append(f"<td>{'–' if html is None else html}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _rank_html(rank: float | None) -> str:
    return f" <span class=muted>[{_num(rank, 2)}]</span>" if rank is not None else ""


def _metric_table_html(aggs: Sequence[AggregateRow], group: str, ids: Sequence[str]) -> str:
    """Raw means ± stderr (and the mean rank score) per checkpoint × column at ``group``."""
    sel = [a for a in aggs if a.group == group and a.level != "class"]
    index = {(a.checkpoint, a.metric, a.prompt_type): a for a in sel}

    def cell(ck: str, m: str, p: str) -> str | None:
        a = index.get((ck, m, p))
        return None if a is None else f"{_num(a.mean, 4)} ± {_num(a.stderr, 4)}{_rank_html(a.rank_mean)}"

    return _checkpoint_table_html(ids, _columns(sel), cell, arrows=True)


def _concept_table_html(rows: Sequence[MetricRow], concept: str, ids: Sequence[str]) -> str:
    """Each metric's value (and rank score) per checkpoint × column for one concept."""
    sel = [r for r in rows if r.concept == concept]
    index = {(r.checkpoint, r.metric, r.prompt_type): r for r in sel}

    def cell(ck: str, m: str, p: str) -> str | None:
        r = index.get((ck, m, p))
        return None if r is None else f"{_num(r.value, 4)}{_rank_html(r.rank)}"

    return _checkpoint_table_html(ids, _sort_columns({(r.metric, r.prompt_type) for r in sel}), cell)


def metric_info_order() -> tuple[str, ...]:
    return ("image_similarity", "scd", "frechet", "style_loss_dataset", "text_similarity", "vendi",
            "style_loss")


def _settings_html(settings: Mapping[str, Any]) -> str:
    if not settings:
        return ""
    out = ["<table>"]
    for k, v in settings.items():
        text = json.dumps(v, default=str) if isinstance(v, dict | list) else str(v)
        out.append(f"<tr><th class=l>{_e(k)}</th><td class=l>{_e(text)}</td></tr>")
    out.append("</table>")
    return "".join(out)


def write_html(result: EvalResult, *, grid_images: int = 8, thumb: int = 128, dataset_images: int = 8) -> Path:
    """Write ``report.html`` with its ``plots/`` and ``grids/`` into ``result.out_dir`` (see the module doc)."""
    out = result.out_dir
    ids = [c.id for c in result.checkpoints]
    all_ids = [BASE_ID, *ids] if any(r.checkpoint == BASE_ID for r in result.rows) else ids
    groups = ["all", *sorted({a.group for a in result.aggregates if a.level == "category"})]
    parts: list[str] = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>Lyco evaluation — {_e(out.name)}</title><style>{CSS}</style></head><body>",
        "<h1>Lyco evaluation report</h1>",
        f"<p class=muted>{len(ids)} checkpoint(s), {len(result.concepts)} concept(s), {len(result.rows)} metric "
        f"values. Rank scores: 1 = best, 0 = worst among the checkpoints, per concept, prompt type and metric "
        f"(distances reversed); averaged over sub-classes → classes → categories.</p>",
    ]
    if result.warnings:
        parts.append("<ul>" + "".join(f"<li class=warn>{_e(w)}</li>" for w in result.warnings) + "</ul>")

    parts.append("<h2>Ranking</h2>")
    parts.append(_ranking_html(result.ranking, "per checkpoint (higher is better, as in the paper's Table 1)"))
    n_algos = len(next(iter(result.ranking_by_algo.values()))) if result.ranking_by_algo else 0
    if 1 < n_algos < len(ids):  # only when some algorithm has several checkpoints
        parts.append(_ranking_html(result.ranking_by_algo, "per algorithm (scores averaged over its checkpoints)"))
    parts.append("<h3>Criterion scores (mean normalized rank, all classes)</h3>")
    parts.append(_scores_html(result.scores, ids))

    parts.append("<h2>Trade-offs</h2><p class=muted>Normalized rank scores, mean ± standard error over classes; "
                 "one point per checkpoint, coloured by algorithm.</p>")
    for group in groups:
        imgs = []
        for k, (x, y, title) in enumerate(SCATTER_PAIRS):
            p = scatter_plot(result.aggregates, result.checkpoints, x, y, group,
                             out / "plots" / f"scatter-{_slug(group)}-{k}.png", f"{title} — {group}")
            if p is not None:
                imgs.append(f"<img src='{_e(_rel(p, out))}' alt='{_e(title)}'>")
        if imgs:
            parts.append(f"<h3>{_e(group)}</h3><div class=plots>{''.join(imgs)}</div>")

    parts.append("<h2>Metrics</h2><p class=muted>Raw values, mean ± standard error over classes; "
                 "[mean rank score]. ↑ higher is better, ↓ lower is better.</p>")
    for group in groups:
        parts.append(f"<h3>{_e(group)}</h3>")
        parts.append(_metric_table_html(result.aggregates, group, all_ids))

    if result.shap:
        parts.append("<h2>SHAP analysis</h2><p class=muted>CatBoost regressors of each column's mean rank score on "
                     "algorithm, preset, epoch, capacity and learning-rate level (the paper's Figure 2).</p>"
                     "<div class=plots>")
        for res in result.shap:
            p = beeswarm_plot(res, out / "plots" / f"shap-{_slug(res.group)}-{res.metric}-{res.prompt_type}.png")
            parts.append(f"<img src='{_e(_rel(p, out))}' alt='SHAP {_e(res.metric)}'>")
        parts.append("</div>")

    parts.append("<h2>Concepts</h2>")
    by_concept: dict[str, dict[str, list[ImageRef]]] = defaultdict(lambda: defaultdict(list))
    for im in result.images:
        by_concept[im.concept][im.prompt_type].append(im)
    slugs: dict[str, str] = {}
    for concept in result.concepts:
        slug = _slug(concept.name)
        while slug in slugs.values():  # "a/b" and "a_b" must not share files
            slug += "_"
        slugs[concept.name] = slug
        parts.append(f"<h3>{_e(concept.name)} <span class=muted>— {_e(concept.descriptor)}</span></h3>")
        parts.append(_concept_table_html(result.rows, concept.name, all_ids))
        if concept.images:
            p = image_grid([("dataset", list(concept.images[:dataset_images]), True)],
                           out / "grids" / f"{slug}-dataset.jpg", thumb)
            parts.append(f"<div class=grid><img src='{_e(_rel(p, out))}' alt='dataset images'></div>")
        per_type = by_concept.get(concept.name, {})
        for pt in sorted(per_type, key=_pt_order):
            ims = per_type[pt]
            ref_rows = [i for i in ims if i.checkpoint == (ids[0] if ids else BASE_ID)] or ims
            keys = grid_columns(ref_rows, grid_images)
            lookup = {(i.checkpoint, i.prompt, i.seed): i.path for i in ims}
            present = [ck for ck in all_ids if any(i.checkpoint == ck for i in ims)]
            rows = [(ck, [lookup.get((ck, pr, sd)) for pr, sd in keys], False) for ck in present]
            rows.append(("dataset", list(concept.images[:len(keys)]), True))
            p = image_grid(rows, out / "grids" / f"{slug}-{pt}.jpg", thumb)
            prompts = "".join(f"<li>{_e(pr)} <span class=muted>(seed {sd})</span></li>" for pr, sd in keys)
            parts.append(f"<details open><summary>{_e(pt)} prompts</summary><div class=grid>"
                         f"<img src='{_e(_rel(p, out))}' alt='{_e(concept.name)} {_e(pt)}'></div>"
                         f"<ol class=prompts>{prompts}</ol></details>")

    parts.append("<h2>Settings</h2>")
    parts.append(_settings_html(result.settings))
    if result.stats:
        parts.append(_settings_html(result.stats))
    parts.append("<p class=muted>Files: <a href='results.csv'>results.csv</a>, <a href='aggregates.csv'>"
                 "aggregates.csv</a>, <a href='results.json'>results.json</a>.</p></body></html>\n")
    path = write_text(out / "report.html", "".join(parts))
    result.files["html"] = path
    return path


def write_report(result: EvalResult, *, html_report: bool = True, grid_images: int = 8, thumb: int = 128) -> None:
    """Write every output file of ``result`` (tables, then the HTML report unless ``html_report`` is False)."""
    result.out_dir.mkdir(parents=True, exist_ok=True)
    write_tables(result)
    if html_report:
        write_html(result, grid_images=grid_images, thumb=thumb)
