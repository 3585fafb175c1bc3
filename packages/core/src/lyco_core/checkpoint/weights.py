"""What an operation may be given as "the base": one rule turning it into ``key → (W, b)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import IncompatibleBaseError

WeightAndBias = tuple[torch.Tensor, torch.Tensor | None]
BaseGetter = Callable[[str], WeightAndBias]
#: A base for the ops: a path (opened with :func:`~.base.open_base`), a :class:`~.base.BaseCheckpoint` (or any
#: object with ``.weight(key)`` and optionally ``.resolve(key)``), a mapping ``key → (W, b)``, or such a callable.
BaseLike = str | Path | Callable[[str], WeightAndBias] | Mapping[str, WeightAndBias] | Any


def base_getter(base: BaseLike | None) -> BaseGetter | None:
    """``key → (W, b)`` for ``base`` (None gives None). A key the base lacks raises
    :class:`IncompatibleBaseError` naming it. A path is opened here and closed when the getter is collected."""
    if base is None:
        return None
    if isinstance(base, (str, Path)):
        from .base import open_base

        base = open_base(base)

    def get(key: str) -> WeightAndBias:
        if hasattr(base, "weight") and callable(base.weight):
            resolved = base.resolve(key) if hasattr(base, "resolve") else key
            if resolved is None:
                raise IncompatibleBaseError(f"{key}: the base model has no layer for this module")
            w, b = base.weight(resolved)
        elif isinstance(base, Mapping):
            if key not in base:
                raise IncompatibleBaseError(f"{key}: the base model has no layer for this module")
            w, b = base[key]
        else:
            w, b = base(key)
        return w, b

    return get
