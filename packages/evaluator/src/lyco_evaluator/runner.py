"""``evaluate(cfg)``: the whole evaluation, from a config to the report (paper §4-5; evaluation.md §2, §4, §5).

1. Discover the dataset (``lyco_trainer.data.discover``) and build the prompts (:mod:`.prompts`).
2. Generate every prompt × seed for every checkpoint and the base model alone (:mod:`.generate`, image cache).
3. Encode (:mod:`.encoders`, feature cache under ``output.dir/features``) and compute the metrics per checkpoint,
   concept and prompt type (the *protocol* below), one :class:`~.aggregate.MetricRow` each.
4. Rank, aggregate, score the criteria, optionally run the SHAP analysis (:mod:`.aggregate`), and write the tables
   and the HTML report (:mod:`.report`).

Protocol (the official code's sets; "dataset" = the images of the concept's (sub)class folder, preprocessed as
references, ``metrics.reference_mode``; generated images are resized):

=======================  ====================================================  ===================================
metric                   images compared                                       prompt types
=======================  ====================================================  ===================================
image_similarity, scd    DINOv2: dataset × the set's N generated images        train, trigger, alter, agnostic*
text_similarity          CLIP: image k ↔ its prompt line, trigger word mapped  every type
                         (``prompts.text_map``) or removed, token-aware
vendi                    DINOv2 of the set (q = 1, cosine kernel); ``alter``:  train, trigger, alter
                         per prompt, averaged
style_loss               VGG19 Grams: image k ↔ the base model's image k       style, agnostic* (not for the base)
                         (same prompt and seed), mean over k
style_loss_dataset       VGG19 Grams: generated set × dataset, all pairs       train, trigger, alter
frechet                  DINOv2, all concepts pooled per checkpoint: dataset   train (concept ``*``)
                         tiled per concept to the largest one vs generated
=======================  ====================================================  ===================================

On concept-agnostic prompts (no trigger word) the fidelity metrics measure concept *leak*: they are ranked the
other way round and count for preservation (see :func:`lyco_evaluator.aggregate.higher_is_better`). The base
model is evaluated like a checkpoint (a reference line in the tables) but not ranked.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lyco_core.errors import InvalidConfigError, LycoError
from lyco_core.progress import ProgressCallback, progress

from .aggregate import (
    BASE_ID,
    LEAK_TYPES,
    CheckpointInfo,
    MetricRow,
    add_rank_scores,
    aggregate,
    checkpoint_info_from_file,
    criterion_scores,
    ranking_table,
    shap_analysis,
)
from .report import ConceptRef, EvalResult, ImageRef, write_report, write_rows_csv

__all__ = ["EvalResult", "compute_metrics", "evaluate"]

#: prompt types each metric is computed for (see the module docstring)
METRIC_TYPES: dict[str, frozenset[str]] = {
    "image_similarity": frozenset({"train", "trigger", "alter", *LEAK_TYPES}),
    "scd": frozenset({"train", "trigger", "alter", *LEAK_TYPES}),
    "text_similarity": frozenset({"train", "trigger", "alter", "style", *LEAK_TYPES}),
    "vendi": frozenset({"train", "trigger", "alter"}),
    "style_loss": frozenset({"style", *LEAK_TYPES}),
    "style_loss_dataset": frozenset({"train", "trigger", "alter"}),
    "frechet": frozenset({"train"}),
}
POOLED = "*"


class _Encoders:
    """The encoders the enabled metrics need, loaded on first use, and the feature cache."""

    def __init__(self, cfg: Any, cache: Any) -> None:
        self.cfg = cfg
        self.cache = cache
        self._loaded: dict[str, Any] = {}

    def get(self, kind: str) -> Any:
        if kind not in self._loaded:
            from .encoders import load_encoder

            e = self.cfg.encoders
            device = None if e.device == "auto" else e.device
            path = None if e.tiny else getattr(e, kind)
            extra = {"arch": e.open_clip_model} if kind == "clip" and not e.tiny else {}
            self._loaded[kind] = load_encoder(kind, path, tiny=e.tiny, device=device, **extra)
        return self._loaded[kind]

    @property
    def batch(self) -> int:
        return int(self.cfg.encoders.batch_size)

    def image_features(self, kind: str, paths: Sequence[Path], *, reference: bool = False) -> torch.Tensor:
        from .encoders import cached_image_features

        mode = self.cfg.metrics.reference_mode if reference else None
        return cached_image_features(self.get(kind), list(paths), self.cache, reference=reference, mode=mode,
                                     batch_size=1 if reference else self.batch)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        from .encoders import cached_text_features

        # each distinct text once: a repeated text computed twice in one batch can differ in the last bit, and the
        # cache would keep only one of the two (a re-run would then not reproduce the numbers exactly)
        unique = list(dict.fromkeys(texts))
        feats = cached_text_features(self.get("clip"), unique, self.cache, batch_size=max(self.batch, 1))
        where = {t: k for k, t in enumerate(unique)}
        return feats[[where[t] for t in texts]]

    def grams(self, paths: Sequence[Path], *, reference: bool = False) -> torch.Tensor:
        """Flattened VGG19 Grams (N, Σ C²) through the cache (dataset images one at a time: mixed aspects)."""
        from .encoders import cached_image_values
        from .metrics import flatten_grams, gram_matrices

        vgg = self.get("vgg19")
        mode = self.cfg.metrics.reference_mode if reference else None
        return cached_image_values(
            self.cache, list(paths), identity=vgg.identity,
            preprocessing=vgg.preprocessing(reference=reference, mode=mode) + ":gram",
            compute=lambda ims: flatten_grams(gram_matrices(vgg.feature_maps(ims, reference=reference, mode=mode))),
            batch_size=1 if reference else self.batch,
        )

    def style_losses(self, paths: Sequence[Path], base_paths: Sequence[Path]) -> list[float]:
        """Per-pair style loss of ``paths[k]`` vs ``base_paths[k]``; cached per pair (Grams are large)."""
        from .encoders import FeatureCache, image_source
        from .metrics import flatten_grams, gram_matrices, style_loss

        vgg = self.get("vgg19")
        prep = vgg.preprocessing() + ":style_loss"
        keys = [FeatureCache.make_key(vgg.identity, f"{image_source(a)}|{image_source(b)}", prep)
                for a, b in zip(paths, base_paths)]

        def compute(indices: list[int]) -> list[torch.Tensor]:
            from .encoders import open_image

            out: list[torch.Tensor] = []
            for s in range(0, len(indices), self.batch):
                chunk = indices[s:s + self.batch]
                ga = flatten_grams(gram_matrices(vgg.feature_maps([open_image(paths[i]) for i in chunk])))
                gb = flatten_grams(gram_matrices(vgg.feature_maps([open_image(base_paths[i]) for i in chunk])))
                out.extend(v.reshape(1).to(torch.float64) for v in style_loss(ga, gb))
            return out

        values = self.cache.get_many(keys, compute)
        return [float(v.reshape(-1)[0]) for v in values]


def _concept_ref(concept: Any, images: Sequence[Path]) -> ConceptRef:
    return ConceptRef(name=concept.name, category=concept.category, class_name=concept.class_name,
                      subclass=concept.subclass, descriptor=concept.descriptor, images=tuple(images))


def _row(ck: str, c: ConceptRef, pt: str, metric: str, value: float, n: int) -> MetricRow:
    return MetricRow(checkpoint=ck, concept=c.name, category=c.category or "", class_name=c.class_name,
                     subclass=c.subclass, prompt_type=pt, metric=metric, value=float(value), n_images=n)


def compute_metrics(
    cfg: Any,
    concepts: Sequence[ConceptRef],
    prompts: Sequence[Any],
    images: Sequence[Any],
    encoders: _Encoders,
    *,
    callback: ProgressCallback | None = None,
    warnings: list[str] | None = None,
) -> list[MetricRow]:
    """Every enabled metric for every checkpoint (the base included), concept and prompt type (see the module doc).

    ``prompts`` are :class:`~.prompts.PromptSpec` s (for the CLIP texts), ``images`` the
    :class:`~.generate.GeneratedImage` records. Metrics that cannot be computed for a set (e.g. the style loss
    without base images) are skipped with a warning in ``warnings``.
    """
    from . import metrics as M

    enabled = list(dict.fromkeys(cfg.metrics.enabled))
    warn = warnings if warnings is not None else []
    clip_text: dict[tuple[str, str, str], str] = {(p.concept, p.prompt_type, p.text): p.clip_text for p in prompts}
    prompt_order: dict[tuple[str, str, str], int] = {(p.concept, p.prompt_type, p.text): p.index for p in prompts}
    sets: dict[tuple[str, str], dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for im in images:
        sets[(im.concept, im.prompt_type)][im.checkpoint].append(im)
    checkpoints = list(dict.fromkeys(im.checkpoint for im in images))
    rows: list[MetricRow] = []
    needs_dino = any(m in enabled for m in ("image_similarity", "scd", "vendi", "frechet"))
    pooled_ref: dict[str, torch.Tensor] = {}
    pooled_gen: dict[str, list[torch.Tensor]] = defaultdict(list)
    missing_base_warned = False

    for concept in progress(concepts, total=len(concepts), desc="metrics", unit="concept", callback=callback):
        ref_paths = list(concept.images)
        ref_dino = encoders.image_features("dinov2", ref_paths, reference=True) if needs_dino else None
        ref_grams = (encoders.grams(ref_paths, reference=True)
                     if "style_loss_dataset" in enabled else None)
        if ref_dino is not None and "frechet" in enabled:
            pooled_ref[concept.name] = ref_dino
        for pt in sorted({k[1] for k in sets if k[0] == concept.name}):
            per_ck = sets[(concept.name, pt)]
            base_set = sorted(per_ck.get(BASE_ID, []), key=lambda i: i.index)
            base_by_index = {i.index: i for i in base_set}
            for ck in checkpoints:
                ims = sorted(per_ck.get(ck, []), key=lambda i: i.index)
                if not ims:
                    continue
                paths = [Path(i.path) for i in ims]
                n = len(ims)
                gen_dino = None
                if needs_dino and any(pt in METRIC_TYPES[m] for m in enabled if m in
                                      ("image_similarity", "scd", "vendi", "frechet")):
                    gen_dino = encoders.image_features("dinov2", paths)
                for metric in enabled:
                    if pt not in METRIC_TYPES[metric]:
                        continue
                    if metric in ("image_similarity", "scd"):
                        assert ref_dino is not None
                        assert gen_dino is not None
                        fn = M.image_similarity if metric == "image_similarity" else M.squared_centroid_distance
                        rows.append(_row(ck, concept, pt, metric, fn(ref_dino, gen_dino), n))
                    elif metric == "vendi":
                        assert gen_dino is not None
                        if pt == "alter":  # per prompt, averaged (the official `out` diversity)
                            groups: dict[str, list[int]] = defaultdict(list)
                            for k, im in enumerate(ims):
                                groups[im.prompt].append(k)
                            order = sorted(groups, key=lambda t: prompt_order.get((concept.name, pt, t), 0))
                            value = float(np.mean([M.vendi_score(gen_dino[groups[t]]) for t in order]))
                        else:
                            value = M.vendi_score(gen_dino)
                        rows.append(_row(ck, concept, pt, metric, value, n))
                    elif metric == "text_similarity":
                        texts = [clip_text.get((concept.name, pt, im.prompt), im.prompt) for im in ims]
                        img_f = encoders.image_features("clip", paths)
                        txt_f = encoders.text_features(texts)
                        rows.append(_row(ck, concept, pt, metric, M.text_similarity(txt_f, img_f), n))
                    elif metric == "style_loss":
                        if ck == BASE_ID:
                            continue
                        pairs = [(Path(im.path), Path(base_by_index[im.index].path)) for im in ims
                                 if im.index in base_by_index]
                        if len(pairs) < n:
                            if not missing_base_warned:
                                warn.append("style_loss needs the base model's images (generation.base_reference "
                                            "= true); skipped where they are missing")
                                missing_base_warned = True
                            if not pairs:
                                continue
                        losses = encoders.style_losses([a for a, _ in pairs], [b for _, b in pairs])
                        rows.append(_row(ck, concept, pt, metric, float(np.mean(losses)), len(pairs)))
                    elif metric == "style_loss_dataset":
                        assert ref_grams is not None
                        value = M.style_loss_vs_dataset(encoders.grams(paths), ref_grams)
                        rows.append(_row(ck, concept, pt, metric, value, n))
                    elif metric == "frechet":
                        assert gen_dino is not None
                        pooled_gen[ck].append(gen_dino)

    if "frechet" in enabled and pooled_ref:
        # references balanced: every concept tiled up to the largest concept's image count (official eval_fd)
        top = max(len(v) for v in pooled_ref.values())
        ref = torch.cat([v.repeat(math.ceil(top / len(v)), 1)[:top] for v in pooled_ref.values()])
        everything = ConceptRef(POOLED, POOLED, POOLED, None, "all concepts pooled")
        for ck, feats in pooled_gen.items():
            gen = torch.cat(feats)
            try:
                value = M.frechet_distance(ref, gen)
            except LycoError as e:
                warn.append(f"frechet ({ck}): {e}")
                continue
            rows.append(_row(ck, everything, "train", "frechet", value, int(gen.shape[0])))
    return rows


def _checkpoint_infos(specs: Sequence[Any]) -> list[CheckpointInfo]:
    infos = []
    for s in specs:
        info = CheckpointInfo(id=s.id, label=s.id)
        if s.kind == "adapter" and s.path is not None and Path(s.path).suffix.lower() == ".safetensors":
            # a file the loader could read but whose metadata is odd: its facts stay unknown
            with contextlib.suppress(LycoError):
                info = checkpoint_info_from_file(s.id, Path(s.path), s.id)
        for k in ("algo", "preset", "epoch", "capacity", "lr_level"):
            v = getattr(s, k, None)
            if v is not None:
                setattr(info, k, v)
        if s.kind == "model" and info.algo is None:
            info.algo = "full"
        info.extra.update({"strength": s.strength, "group": s.group, "train_seed": s.train_seed, "kind": s.kind})
        infos.append(info)
    return infos


def _settings(cfg: Any, encoders: _Encoders) -> dict[str, Any]:
    g = cfg.generation
    return {
        "base": str(cfg.model.base),
        "dataset": str(cfg.data.root) if cfg.data.root is not None else [str(c.path) for c in cfg.data.concepts],
        "prompt types": list(cfg.prompts.types),
        "images per (sub)class and type": cfg.prompts.n_images,
        "generation": {"scheduler": g.scheduler, "steps": g.steps, "guidance": g.guidance,
                       "size": f"{g.width}x{g.height}", "negative_prompt": g.negative_prompt, "first seed": g.seed},
        "metrics": list(cfg.metrics.enabled),
        "reference preprocessing": cfg.metrics.reference_mode,
        "encoders": {k: v.identity for k, v in encoders._loaded.items()},
    }


def evaluate(cfg: Any, *, callback: ProgressCallback | None = None) -> EvalResult:
    """Run the evaluation ``cfg`` (an :class:`~.config.EvalConfig`) describes and write its report.

    Returns the :class:`~.report.EvalResult` (rows, aggregates, scores, ranking, written files). Images and
    features are cached under ``cfg.output.dir`` (``images/``, ``features/``): a second run computes only what is
    new. ``callback(done, total)`` reports the metric stage's progress in concepts. Raises lyco_core errors (one
    line naming the file or key) for bad inputs.
    """
    from lyco_trainer.data import discover

    from .config import expand_checkpoints
    from .encoders import FeatureCache
    from .generate import generate
    from .prompts import build_prompts, prompt_table

    t0 = time.monotonic()
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = discover(cfg.data)
    specs = expand_checkpoints(cfg)
    if not specs:
        raise InvalidConfigError("checkpoints: nothing to evaluate (add at least one [[checkpoints]] entry)")
    prompts = build_prompts(dataset, cfg)
    if not prompts:
        raise InvalidConfigError("prompts.types: no prompt could be built for any concept")
    write_rows_csv(out / "prompts.csv", prompt_table(prompts),
                   ("concept", "prompt_type", "image", "seed", "prompt", "clip_text"))

    t1 = time.monotonic()
    images = generate(cfg, specs, prompts, out)
    t2 = time.monotonic()

    by_concept: dict[str, list[Path]] = defaultdict(list)
    for item in dataset.items:
        by_concept[item.concept.name].append(Path(item.path))
    concepts = [_concept_ref(c, by_concept.get(c.name, [])) for c in dataset.concepts if by_concept.get(c.name)]
    cache = FeatureCache(out / "features")
    encoders = _Encoders(cfg, cache)
    warnings: list[str] = list(dataset.report.warnings)
    rows = compute_metrics(cfg, concepts, prompts, images, encoders, callback=callback, warnings=warnings)
    t3 = time.monotonic()

    rows = add_rank_scores(rows)
    aggs = aggregate(rows)
    infos = _checkpoint_infos(specs)
    ids = [i.id for i in infos]
    scores = criterion_scores(aggs, ids)
    algo_of = {i.id: (i.algo or "unknown") for i in infos}
    result = EvalResult(
        out_dir=out,
        rows=rows,
        aggregates=aggs,
        checkpoints=infos,
        concepts=concepts,
        images=[ImageRef(i.checkpoint, i.concept, i.prompt_type, i.prompt, i.seed, Path(i.path)) for i in images],
        scores=scores,
        ranking=ranking_table(scores),
        ranking_by_algo=ranking_table(scores, algo_of.__getitem__),
        settings=_settings(cfg, encoders),
        warnings=warnings,
    )
    if cfg.metrics.shap:
        result.shap = shap_analysis(infos, aggs)
        for cat in sorted({a.group for a in aggs if a.level == "category"}):
            result.shap += shap_analysis(infos, aggs, group=cat)
    n_new = sum(1 for i in images if not i.cached)
    result.stats = {
        "images": len(images),
        "images_generated": n_new,
        "images_cached": len(images) - n_new,
        "feature_cache_hits": cache.hits,
        "feature_cache_misses": cache.misses,
        "seconds": {"prompts": round(t1 - t0, 2), "generation": round(t2 - t1, 2), "metrics": round(t3 - t2, 2)},
    }
    write_report(result, html_report=cfg.report.html, grid_images=cfg.report.grid_images)
    result.files["prompts"] = out / "prompts.csv"
    result.stats["seconds"]["report"] = round(time.monotonic() - t3, 2)
    return result

