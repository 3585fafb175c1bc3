"""Bake: a base model with adapters merged into its weights, in the base's own layout, naming and dtype.

The base is streamed: each output file is written tensor by tensor in the input's order (header first, see
:class:`~lyco_core.formats.safetensors_io.StreamWriter`, which writes with direct I/O where it can), opening one
tensor (or one layer's weight + bias) at a time as a memory map of the input, so peak memory stays near a few
layers however big the model is.

Several adapters are applied in the order given, each to the weight the previous one produced — the same result
as stacking them at run time (for additive algorithms the order does not matter). Each layer is merged in float32
with the algorithm's exact rule (:meth:`ModuleTensors.merge`: DoRA, OFT/BOFT and (IA)³ included) and cast back to
the base tensor's dtype.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..buffers import BufferPool
from ..checkpoint import BaseCheckpoint, Target, TensorSource, open_base
from ..errors import FileExistsLycoError, IncompatibleBaseError, InvalidConfigError
from ..files import AdapterFile, ModuleTensors, read_adapter
from ..formats.safetensors_io import StreamWriter, atomic_output, atomic_output_dir
from ..progress import ProgressCallback, progress
from .report import ModuleReport, OpReport
from .resize import plain_lora_factors

#: Header key of a baked safetensors file: JSON list of {adapter, multiplier, modules}.
BAKED_KEY = "lyco.baked"


@dataclass
class _Group:
    """Tensors that one merge step reads and writes together: a layer's weight and bias, or a fused q/k/v tensor."""

    source: int
    tensors: set[str] = field(default_factory=set)
    steps: list[tuple[Target, ModuleTensors, float]] = field(default_factory=list)


def _multipliers(multipliers: Sequence[float] | None, n: int) -> list[float]:
    if multipliers is None or len(multipliers) == 0:
        return [1.0] * n
    if len(multipliers) == 1:
        return [float(multipliers[0])] * n
    if len(multipliers) != n:
        raise InvalidConfigError(f"--multiplier: got {len(multipliers)} values for {n} adapters (give 1 or {n})")
    return [float(m) for m in multipliers]


def plan_bake(
    base: BaseCheckpoint, adapters: Sequence[AdapterFile], multipliers: Sequence[float], skip_unmatched: bool
) -> tuple[dict[str, _Group], OpReport]:
    """Resolve every adapter module to a base layer and check it fits (shapes only), before anything is written.

    Returns the merge groups keyed by ``"<source index>:<tensor name>"`` and the report so far.
    """
    report = OpReport(operation="bake")
    groups: dict[str, _Group] = {}
    for adapter, mult in zip(adapters, multipliers, strict=True):
        where = str(adapter.path)
        for key, module in adapter.modules.items():
            canonical = base.resolve(key)
            if canonical is None:
                if not skip_unmatched:
                    raise IncompatibleBaseError(
                        f"{where}: module {key!r} has no layer in {base.path} (family {base.family}); "
                        "run `lyco adapter check` to see every mismatch, or pass --skip-unmatched"
                    )
                report.dropped[f"{adapter.path}:{key}"] = "no such layer in the base"
                continue
            target = base.targets[canonical]
            module.check_fits(target.shape, target.bias is not None, where)
            names = {target.weight} | ({target.bias} if target.bias else set())
            slots = [f"{target.source}:{n}" for n in names]
            group = next((groups[s] for s in slots if s in groups), None) or _Group(target.source)
            group.tensors |= names
            group.steps.append((target, module, mult))
            for s in slots:
                groups[s] = group
            desc = module.describe()
            report.modules[canonical] = ModuleReport(algo=desc.get("algo"), rank=desc.get("rank"))
    return groups, report


#: Rows of a weight merged at a time on the fast path: about this many float32 values (4 MiB), so the block stays in
#: cache while it is read, updated and written back.
_BLOCK_VALUES = 1 << 20

#: ``[(U, D, μ)]``: the plain low-rank steps of a group, ΔW = Σ μ·U·D (U (O, r) with the α/r scale, D (r, I·∏k)).
LowRankSteps = list[tuple[torch.Tensor, torch.Tensor, float]]


def _low_rank_steps(group: _Group) -> LowRankSteps | None:
    """The group's steps when every one is a plain LoRA/LoCon on one unsliced weight, else None."""
    if any(t.rows is not None or t.weight != group.steps[0][0].weight for t, _, _ in group.steps):
        return None
    out = []
    for _target, module, mult in group.steps:
        factors = plain_lora_factors(module)
        if factors is None:
            return None
        up, down, _shape = factors
        out.append((up, down, mult))
    return out


def _merge_rows(weight: torch.Tensor, steps: LowRankSteps, scratch: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = W + Σ μ·U·D, computed in float32 a block of rows at a time and stored in W's dtype.

    The same numbers as building ΔW whole, without a full-size float32 copy of W or ΔW: each block of ``weight``
    ((O, I·∏k), may be a read-only memory map) is copied into ``scratch`` (float32, at least :data:`_BLOCK_VALUES`
    and one row long), updated with ``addmm_`` and stored into ``out`` (same shape, W's dtype) while in cache.
    """
    cols = weight.shape[1]
    rows = max(1, _BLOCK_VALUES // max(1, cols))
    for i in range(0, weight.shape[0], rows):
        n = min(rows, weight.shape[0] - i)
        block = scratch[: n * cols].view(n, cols)
        block.copy_(weight[i : i + n])
        for up, down, mult in steps:
            block.addmm_(up[i : i + n], down, alpha=mult)
        out[i : i + n].copy_(block)


def _run_group(
    group: _Group,
    read: Callable[[str], torch.Tensor],
    fast: LowRankSteps | None,
    pool: BufferPool,
    scratch: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Merge every step of a group; returns the new tensors in the base's dtypes.

    Plain LoRA/LoCon steps (``fast``) take the row-block path (:func:`_merge_rows`) from the tensor as read (a
    memory map) into a buffer from ``pool``. Everything else goes through :meth:`ModuleTensors.merge`, the exact
    rule of its algorithm, on float32 copies of tensors ``read`` as private copies from ``pool``, which go back to
    it once nothing returned shares their memory.
    """
    original = {n: read(n) for n in group.tensors}
    if fast is not None:
        name = group.steps[0][0].weight
        w = original[name]
        out = pool.take(w.numel() * w.element_size()).view(w.dtype).view(w.shape)
        _merge_rows(w.reshape(w.shape[0], -1), fast, scratch, out.view(w.shape[0], -1))
        return {**original, name: out}
    work = {n: t.float() for n, t in original.items()}
    for target, module, mult in group.steps:
        w = work[target.weight]
        b = work[target.bias] if target.bias else None
        if target.rows is not None:
            lo, hi = target.rows
            new_w, new_b = module.merge(w[lo:hi], None if b is None else b[lo:hi], mult)
            w[lo:hi] = new_w
            if b is not None and new_b is not None:
                b[lo:hi] = new_b
        else:
            new_w, new_b = module.merge(w, b, mult)
            work[target.weight] = new_w
            if target.bias and new_b is not None:
                work[target.bias] = new_b
            elif new_b is not None and b is None:
                raise IncompatibleBaseError(
                    f"{module.key}: the adapter changes the bias of {target.weight}, but the base layer has no bias"
                )
    result = {n: work[n].to(original[n].dtype) for n in group.tensors}
    kept = {t.untyped_storage().data_ptr() for t in result.values()}
    for t in original.values():
        if t.untyped_storage().data_ptr() not in kept:
            pool.give(t)
    return result


class _ReadAhead:
    """Opens a source's tensors in file order on a background thread, a few tensors ahead of the consumer.

    Most tensors are memory maps of the file (no copy; the thread pays for mapping their pages); the names in
    ``private`` are read into buffers from ``pool`` instead, because the merge rule works on them in place.
    Tensors asked for out of order (a fused group's partner) are opened directly.
    """

    def __init__(self, src: TensorSource, pool: BufferPool, private: set[str], depth: int = 4) -> None:
        self._src = src
        self._buffers = pool
        self._private = private
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lyco-read")
        self._order = list(src.names)
        self._next = 0
        self._pending: dict[str, Future[torch.Tensor]] = {}
        self._taken: set[str] = set()  # read out of order: never queue them again
        self._depth = depth

    def _open(self, name: str) -> torch.Tensor:
        return self._src.get(name, self._buffers) if name in self._private else self._src.view(name)

    def _fill(self) -> None:
        while len(self._pending) < self._depth and self._next < len(self._order):
            name = self._order[self._next]
            self._next += 1
            if name not in self._taken:
                self._pending[name] = self._pool.submit(self._open, name)

    def get(self, name: str) -> torch.Tensor:
        self._fill()
        future = self._pending.pop(name, None)
        if future is None:
            self._taken.add(name)
            t = self._open(name)
        else:
            t = future.result()
        self._fill()
        return t

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _stream_file(
    base: BaseCheckpoint,
    index: int,
    out: Path,
    groups: dict[str, _Group],
    metadata: dict[str, str],
    tick: Callable[[str], None],
) -> None:
    """Write source ``index`` of ``base`` to ``out`` with the groups merged, in the source's order and dtypes.

    Tensors are opened ahead on one thread, copied out on another and written to the device on a third (bounded
    queues), so at most a handful are held at a time; merged tensors' memory is recycled through a
    :class:`~lyco_core.buffers.BufferPool`.
    """
    src = base.sources[index]
    layout = [(n, src.dtype(n), src.shape(n)) for n in src.names]
    mine = {id(g): g for k, g in groups.items() if k.startswith(f"{index}:")}
    fast = {i: _low_rank_steps(g) for i, g in mine.items()}
    private = {n for i, g in mine.items() if fast[i] is None for n in g.tensors}
    width = max([math.prod(src.shape(g.steps[0][0].weight)[1:]) for i, g in mine.items() if fast[i]], default=1)
    scratch = torch.empty(max(_BLOCK_VALUES, width), dtype=torch.float32)
    pool = BufferPool()
    writer = StreamWriter(out, layout, metadata)
    reader = _ReadAhead(src, pool, private)

    def write(name: str, tensor: torch.Tensor) -> None:
        writer.write(name, tensor)
        pool.give(tensor)

    cache: dict[str, torch.Tensor] = {}  # tensors read (or merged) before their turn to be written

    def take(name: str) -> torch.Tensor:
        return cache.pop(name) if name in cache else reader.get(name)

    writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lyco-write")
    queued: list[Future[None]] = []
    try:
        for name in src.names:
            group = groups.get(f"{index}:{name}")
            if group is None:
                tensor = take(name)
            else:
                if name not in cache:
                    cache.update(_run_group(group, take, fast[id(group)], pool, scratch))
                    for step in group.steps:
                        tick(step[0].key)
                tensor = cache.pop(name)
            queued.append(writes.submit(write, name, tensor))
            if len(queued) > 4:  # bound the tensors waiting to be written
                queued.pop(0).result()
        for f in queued:
            f.result()
        writer.finish()
    except BaseException:
        writes.shutdown(wait=True, cancel_futures=True)
        writer.abort()
        raise
    finally:
        reader.close()
        writes.shutdown(wait=True)


def _baked_metadata(
    src_meta: dict[str, str], adapters: Sequence[AdapterFile], mults: Sequence[float]
) -> dict[str, str]:
    meta = dict(src_meta)
    record = [
        {"adapter": os.path.basename(str(a.path)), "multiplier": m, "modules": len(a.modules)}
        for a, m in zip(adapters, mults, strict=True)
    ]
    meta[BAKED_KEY] = json.dumps(record)
    return meta


def bake(
    base_path: str | Path,
    adapter_paths: Sequence[str | Path],
    output: str | Path,
    *,
    multipliers: Sequence[float] | None = None,
    skip_unmatched: bool = False,
    overwrite: bool = False,
    progress_callback: ProgressCallback | None = None,
) -> OpReport:
    """Merge adapters into a base model and write it to ``output`` in the base's layout, naming and dtype.

    ``base_path``: a diffusers folder (``output`` is then a folder: weight files rewritten, every other file
    copied), a diffusers-named safetensors state dict or an LDM single file (``output`` is a ``.safetensors``
    file; a ``.ckpt`` base is written as safetensors with the same tensor names). ``multipliers``: one per adapter,
    or one for all (default 1). Every adapter module must resolve to a base layer and fit its shape; with
    ``skip_unmatched`` the ones that do not are listed in ``report.dropped`` instead. Nothing is written until
    all of that is checked, and the output appears atomically.
    """
    if not adapter_paths:
        raise InvalidConfigError("bake: give at least one adapter file")
    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsLycoError(f"{out} exists; pass overwrite/--force")
    mults = _multipliers(multipliers, len(adapter_paths))
    adapters = [read_adapter(p) for p in adapter_paths]
    with open_base(base_path) as base:
        groups, report = plan_bake(base, adapters, mults, skip_unmatched)
        report.output = str(out)
        for a in adapters:
            if a.unknown_tensors:
                report.warnings.append(f"{a.path}: {len(a.unknown_tensors)} tensor(s) no algorithm uses were ignored")
        n_steps = sum(len(a.modules) for a in adapters) - len(report.dropped)
        bar = iter(progress(range(n_steps), n_steps, "bake", "modules", progress_callback))

        def tick(_key: str) -> None:
            next(bar, None)

        if base.kind == "diffusers-folder":
            _bake_folder(base, out, groups, adapters, mults, overwrite, tick)
        else:
            if out.suffix.lower() != ".safetensors":
                raise InvalidConfigError(f"{out}: a baked single-file model is written as .safetensors")
            src_meta = base.sources[0].metadata
            with atomic_output(out, overwrite) as tmp:
                _stream_file(base, 0, tmp, groups, _baked_metadata(src_meta, adapters, mults), tick)
        for _ in bar:
            pass
    return report


def _bake_folder(
    base: BaseCheckpoint,
    out: Path,
    groups: dict[str, _Group],
    adapters: Sequence[AdapterFile],
    mults: Sequence[float],
    overwrite: bool,
    tick: Callable[[str], None],
) -> None:
    rewritten = {s.path.resolve(): i for i, s in enumerate(base.sources)}
    with atomic_output_dir(out, overwrite) as tmp:
        for root, _dirs, files in os.walk(base.path):
            rel = Path(root).relative_to(base.path)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                src_file = Path(root) / f
                dst = tmp / rel / f
                index = rewritten.get(src_file.resolve())
                if index is None:
                    shutil.copy2(src_file, dst)
                else:
                    meta = _baked_metadata(base.sources[index].metadata, adapters, mults)
                    _stream_file(base, index, dst, groups, meta, tick)


__all__ = ["BAKED_KEY", "bake", "plan_bake"]
