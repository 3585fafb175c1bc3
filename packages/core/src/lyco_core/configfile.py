"""TOML config files as Lyco's commands read them: one rule for every config (training, evaluation, presets).

:func:`read_toml` reads a file, :func:`apply_overrides` applies ``--set key=value`` overrides by dotted path (values
are TOML scalars or arrays, else plain strings), and :func:`validate` turns a dict into a pydantic model with a
one-line error naming the key (``unknown key 'train.epoch'``, ``missing key 'model.base'``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import InvalidConfigError, NotFoundError

M = TypeVar("M", bound=BaseModel)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML document at ``path``; NotFoundError / InvalidConfigError name the file."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"{p}: no such config file")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InvalidConfigError(f"{p}: not valid TOML ({e})") from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", …]`` applied to a config dict (new dicts along the changed paths; ``doc`` is unchanged)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InvalidConfigError(f"--set {item!r}: expected key=value")
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = _parse_value(value.strip())
    return out


def first_error(e: ValidationError, source: str) -> str:
    """The first validation error as one line naming the key."""
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key {where!r}"
    if err["type"] == "missing":
        return f"{source}: missing key {where!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{source}: {where}: {msg}" if where != "(top level)" else f"{source}: {msg}"


def validate(model: type[M], doc: dict[str, Any], source: str = "config") -> M:
    """``model.model_validate(doc)`` with a one-line :class:`InvalidConfigError` naming the key."""
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise InvalidConfigError(first_error(e, source)) from None


__all__ = ["apply_overrides", "first_error", "read_toml", "validate"]
