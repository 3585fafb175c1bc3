"""Data balancing (paper §5.1): repeat images so every class is seen equally often per epoch.

The paper: "To address dataset imbalance, we repeat each image a number of times within each epoch to ensure
images from different classes are equally exposed during training." Here the balanced unit is the concept (one
image folder: a class, or a sub-class when the tree has them). With ``n_c`` images in concept ``c``, ``r_c`` its
repeats and ``N = max_c n_c``, one epoch holds

- balancing on (default): ``T_c = N · r_c`` samples of concept ``c`` — every concept as many as the largest, and
  the per-concept repeats act as relative weights on top (``repeats = 2`` → seen twice as often as the others);
- balancing off: ``T_c = n_c · r_c`` (sd-scripts' plain repeats).

``T_c`` is spread over the concept's images as evenly as integers allow: each image gets ``⌊T_c/n_c⌋`` or one
more. Which images get the extra one rotates from epoch to epoch, so over ``n_c`` epochs every image is seen
exactly ``T_c/n_c`` times on average. The extras are apportioned per (concept, bucket) group with fixed counts
(largest remainder), so the number of samples in each bucket, hence the number of batches, is the same in every
epoch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def concept_targets(counts: Mapping[str, int], repeats: Mapping[str, int], balance: bool) -> dict[str, int]:
    """Samples per epoch of each concept: ``max(counts) · repeats`` when balancing, else ``count · repeats``."""
    if not counts:
        return {}
    top = max(counts.values())
    return {c: (top if balance else n) * repeats[c] for c, n in counts.items()}


def apportion(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``sizes`` (largest remainder; ties: the earlier index).

    The parts sum to ``total``; each part is ``⌊total·s/Σs⌋`` or one more.
    """
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    parts = [total * s // whole for s in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % whole), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def rotated_repeats(n: int, total: int, epoch: int) -> list[int]:
    """Repeats of each of ``n`` images so that they sum to ``total``; the ``total mod n`` extras rotate by epoch.

    Image ``i`` gets ``total // n`` plus one when ``(i - epoch·extra) mod n < extra``: consecutive epochs hand the
    extras to the next images in order, so over ``n`` epochs every image gets the same count.
    """
    if n == 0:
        return []
    base, extra = divmod(total, n)
    start = (epoch * extra) % n
    return [base + (1 if (i - start) % n < extra else 0) for i in range(n)]


def group_repeats(
    groups: Mapping[K, tuple[str, int]],
    repeats: Mapping[str, int],
    balance: bool,
    epoch: int,
) -> dict[K, list[int]]:
    """Per-image repeats for one epoch.

    ``groups`` maps a key (e.g. (concept, bucket)) to (concept name, number of images); a concept may span
    several groups, and its images are counted over all of them. ``repeats`` is per concept. Returns, per group,
    the repeat count of each of its images in order. Groups of one concept share its target in their mapping order.
    """
    counts: dict[str, int] = {}
    for concept, n in groups.values():
        counts[concept] = counts.get(concept, 0) + n
    targets = concept_targets(counts, repeats, balance)
    by_concept: dict[str, list[K]] = {}
    for key, (concept, _) in groups.items():
        by_concept.setdefault(concept, []).append(key)
    out: dict[K, list[int]] = {}
    for concept, keys in by_concept.items():
        shares = apportion(targets[concept], [groups[k][1] for k in keys])
        for key, share in zip(keys, shares):
            out[key] = rotated_repeats(groups[key][1], share, epoch)
    return out
