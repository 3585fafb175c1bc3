"""Training data (paper §5.1): concept folders, captions, balancing, aspect-ratio buckets, epoch plans.

``discover(cfg.data)`` → :class:`Dataset` (items, concepts, report; file system only, before any model is loaded);
``plan_epoch(dataset, cfg.data, batch_size, seed, epoch)`` → list of :class:`Batch` (one bucket each);
``caption_for(item, cfg.data, rng)`` → a caption draw; ``load_image(item, bucket)`` → (3, H, W) in [-1, 1].
"""

from .balance import apportion, concept_targets, group_repeats, rotated_repeats
from .buckets import Crop, assign_bucket, buckets_for, crop_box, make_buckets
from .captions import caption_for, caption_tags, captions_are_fixed, full_caption, split_tags
from .concepts import CONCEPT_FILE, IMAGE_EXTENSIONS, Concept, ImageItem, SkippedFile, parse_folder_name
from .dataset import (
    Batch,
    ConceptReport,
    DataReport,
    Dataset,
    EpochPlan,
    batches_per_epoch,
    discover,
    epoch_samples,
    load_image,
    plan_epoch,
)

__all__ = [
    "CONCEPT_FILE",
    "IMAGE_EXTENSIONS",
    "Batch",
    "Concept",
    "ConceptReport",
    "Crop",
    "DataReport",
    "Dataset",
    "EpochPlan",
    "ImageItem",
    "SkippedFile",
    "apportion",
    "assign_bucket",
    "batches_per_epoch",
    "buckets_for",
    "caption_for",
    "caption_tags",
    "captions_are_fixed",
    "concept_targets",
    "crop_box",
    "discover",
    "epoch_samples",
    "full_caption",
    "group_repeats",
    "load_image",
    "make_buckets",
    "parse_folder_name",
    "plan_epoch",
    "rotated_repeats",
    "split_tags",
]
