"""Resumable training states: ``<output.dir>/state-<step>/``, written atomically with a completion marker.

A state folder holds everything needed to continue a run exactly where it stopped:

* ``trainable.safetensors`` — the trained tensors (the adapter network's ``state_dict``, or for ``native`` the
  UNet's / text encoders' parameters), float32 as in memory;
* ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt`` with fp16) — the ``state_dict`` of each (``torch.save``,
  read back with ``weights_only=True``);
* ``rng.pt`` — the RNG states of python ``random``, numpy, torch (CPU) and every CUDA device;
* ``state.json`` — global step, position in the data order (epoch, index of the next batch), losses so far, and
  a fingerprint of the settings that must not change across a resume;
* ``COMPLETE`` — written last; a folder without it is never used.

The folder is built under a temporary name and renamed into place
(:func:`lyco_core.formats.safetensors_io.atomic_output_dir`), so ``state-<step>`` is either complete or absent.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lyco_core.errors import CorruptFileError, InvalidConfigError, NotFoundError
from lyco_core.formats.safetensors_io import atomic_output_dir, load_tensors, save_tensors

MARKER = "COMPLETE"
STATE_VERSION = 1
_NAME = re.compile(r"state-(\d+)")


@dataclass
class TrainingState:
    """Where a run is: ``step`` optimiser steps done; the next micro-batch is batch ``batch`` of epoch ``epoch``
    (0-based; ``batch`` may equal the epoch's batch count, meaning the epoch is finished)."""

    step: int
    epoch: int
    batch: int
    losses: list[float] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedState:
    """A state read back from disk (tensors on CPU)."""

    path: Path
    info: TrainingState
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]


# --------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU, every CUDA device) as torch-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    version, internal, gauss_py = random.getstate()
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss_py],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the global RNG states captured by :func:`capture_rng`."""
    version, internal, gauss_py = rng["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_py))
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


# --------------------------------------------------------------------------------------------- folders
def state_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"state-{step:08d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_states(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete states in ``output_dir`` as (step, path), oldest first."""
    out: list[tuple[int, Path]] = []
    d = Path(output_dir)
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir() and is_complete(p):
            out.append((int(m[1]), p))
    return sorted(out)


def latest_state(output_dir: Path) -> Path | None:
    """The newest complete state in ``output_dir``, or None."""
    states = list_states(output_dir)
    return states[-1][1] if states else None


def resolve_resume(resume: bool | str | Path, output_dir: Path) -> Path | None:
    """What ``--resume`` means: False → None; True → the newest complete state in ``output_dir`` (an error when
    there is none); a path → that state folder (an error when it is missing or incomplete)."""
    if resume is False or resume is None:
        return None
    if resume is True:
        found = latest_state(output_dir)
        if found is None:
            raise NotFoundError(f"--resume: no complete state-* folder in {output_dir}")
        return found
    p = Path(resume)
    if not p.is_dir():
        raise NotFoundError(f"--resume {p}: no such state folder")
    if not is_complete(p):
        raise CorruptFileError(f"--resume {p}: incomplete state (no {MARKER} marker); use an older state-* folder")
    return p


def _torch_save(obj: Any, path: Path) -> None:
    torch.save(obj, str(path))


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: missing from the state folder") from None
    except Exception as e:  # torch raises several kinds for damaged pickles
        raise CorruptFileError(f"{path}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None


def save_state(
    output_dir: Path,
    info: TrainingState,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any = None,
    *,
    keep: int | None = None,
) -> Path:
    """Write ``state-<step>/`` (replacing one of the same step) and keep only the newest ``keep`` states."""
    target = state_dir(output_dir, info.step)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(target, overwrite=True) as tmp:
        save_tensors(tmp / "trainable.safetensors", {k: v.detach() for k, v in trainable.items()})
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            _torch_save(scaler.state_dict(), tmp / "scaler.pt")
        _torch_save(capture_rng(), tmp / "rng.pt")
        doc = {"version": STATE_VERSION, "step": info.step, "epoch": info.epoch, "batch": info.batch,
               "losses": info.losses, "fingerprint": info.fingerprint}
        (tmp / "state.json").write_text(json.dumps(doc, indent=1))
        (tmp / MARKER).write_text(f"step {info.step}\n")  # last: the folder is complete
    if keep is not None:
        prune_states(output_dir, keep)
    return target


def prune_states(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete states; returns what was deleted."""
    states = list_states(output_dir)
    gone = [p for _, p in states[: max(0, len(states) - keep)]]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def load_state(path: Path) -> LoadedState:
    """Read a complete state folder (see the module doc)."""
    p = Path(path)
    if not is_complete(p):
        raise CorruptFileError(f"{p}: incomplete state (no {MARKER} marker)")
    try:
        doc = json.loads((p / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{p / 'state.json'}: unreadable ({e})") from None
    if doc.get("version") != STATE_VERSION:
        raise CorruptFileError(f"{p / 'state.json'}: state version {doc.get('version')!r}, expected {STATE_VERSION}")
    info = TrainingState(step=int(doc["step"]), epoch=int(doc["epoch"]), batch=int(doc["batch"]),
                         losses=[float(x) for x in doc.get("losses", [])], fingerprint=doc.get("fingerprint", {}))
    scaler = _torch_load(p / "scaler.pt") if (p / "scaler.pt").is_file() else None
    return LoadedState(
        path=p,
        info=info,
        trainable=load_tensors(p / "trainable.safetensors"),
        optimizer=_torch_load(p / "optimizer.pt"),
        scheduler=_torch_load(p / "scheduler.pt"),
        scaler=scaler,
        rng=_torch_load(p / "rng.pt"),
    )


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """A resume must keep the settings that define the data order and the trained tensors."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise InvalidConfigError(
                f"--resume {where}: {key} was {saved[key]!r} in the interrupted run, now {value!r}; "
                "resume with the same config"
            )


__all__ = [
    "MARKER",
    "LoadedState",
    "TrainingState",
    "capture_rng",
    "check_fingerprint",
    "is_complete",
    "latest_state",
    "list_states",
    "load_state",
    "prune_states",
    "resolve_resume",
    "restore_rng",
    "save_state",
    "state_dir",
]
