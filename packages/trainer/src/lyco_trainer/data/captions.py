"""Captions (paper §5.1): ``"[V], tag1, …, tagk"`` from the concept descriptor and the image's tag file.

The full caption of an image is its concept's descriptor ``[V] = "trigger [class_word]"`` followed by the tags
of its same-name caption file, split on commas: ``"sks dog, 1girl, smile, outdoors"``. A tag equal to the
descriptor or to the trigger (case-insensitive) is dropped from the file's tags, so caption files that already
start with the trigger do not repeat it. An image without a caption file gets the descriptor alone (discover
warns about it). Per draw (:func:`caption_for`), in this order:

1. caption dropout: with probability ``caption_dropout`` the caption is ``""`` (prefix and suffix included),
   which trains the unconditional prediction used by classifier-free guidance;
2. tag shuffle (``shuffle_tags``): the first ``keep_tokens`` tags (the descriptor counts as the first) stay in
   place, the rest are permuted;
3. tag dropout: each tag after the first ``keep_tokens`` is dropped with probability ``tag_dropout``;
4. ``prefix`` and ``suffix`` are added verbatim (include your own separator, e.g. ``prefix = "photo, "``).
"""

from __future__ import annotations

import random

from ..config import DataConfig
from .concepts import ImageItem


def split_tags(text: str | None) -> list[str]:
    """``"a, b ,, c"`` → ["a", "b", "c"] (empty tags dropped)."""
    if not text:
        return []
    return [t for t in (s.strip() for s in text.split(",")) if t]


def caption_tags(item: ImageItem) -> list[str]:
    """The image's caption as a tag list: [descriptor, *tags] (the descriptor left out when empty)."""
    concept = item.concept
    descriptor = concept.descriptor
    skip = {descriptor.lower(), concept.trigger.lower()} - {""}
    tags = [t for t in split_tags(item.caption) if t.lower() not in skip]
    return ([descriptor] if descriptor else []) + tags


def full_caption(item: ImageItem, cfg: DataConfig) -> str:
    """The caption without randomness (no shuffle, no dropout), with prefix and suffix."""
    return f"{cfg.prefix}{', '.join(caption_tags(item))}{cfg.suffix}"


def captions_are_fixed(cfg: DataConfig) -> bool:
    """True when :func:`caption_for` always returns :func:`full_caption` (text-encoder outputs may be cached)."""
    return not cfg.shuffle_tags and cfg.caption_dropout == 0.0 and cfg.tag_dropout == 0.0


def caption_for(item: ImageItem, cfg: DataConfig, rng: random.Random) -> str:
    """One draw of ``item``'s training caption (see the module docstring for the steps and their order).

    Deterministic for a given ``rng`` state; draws from ``rng`` only for the options that are enabled.
    """
    if cfg.caption_dropout > 0.0 and rng.random() < cfg.caption_dropout:
        return ""
    tags = caption_tags(item)
    keep, rest = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
    if cfg.shuffle_tags:
        rng.shuffle(rest)
    if cfg.tag_dropout > 0.0:
        rest = [t for t in rest if rng.random() >= cfg.tag_dropout]
    return f"{cfg.prefix}{', '.join(keep + rest)}{cfg.suffix}"
