"""Adapter-operation jobs (CPU queue): the :mod:`lyco_core.ops` function of the same name on stored files.

Job params (written by the API's ``routes/ops.py``)::

    {"op": "merge",                                  # inspect, check, bake, merge, rescale, resize, convert, extract
     "inputs": {"adapters": ["<file id>", "<file id>"], "base": "<file id>"},
     "options": {"weights": [1.0, 0.5], "rank": 8, "dtype": "fp16"},
     "output_name": "merged.safetensors"}            # optional

``inputs`` values are ids of files of the job's user (or absolute paths the API already resolved, e.g. a base model
under the models folder); :data:`OPS` lists each operation's inputs (``[]`` = a list) and accepted options. The
output is written in ``<work_dir>/out/`` and registered when the job ends (``adapter``; ``bake`` → ``model``, a
folder as a zip); ``inspect`` and ``check`` write nothing. ``result["report"]`` is the operation's report as JSON
(``OpReport``, ``CheckReport`` or the inspect dict); the task adds ``result["files"]`` / ``result["file_id"]``.

:func:`run_op` runs one op job to its end in the calling process (the Celery task does the same); the API's
embedded mode and tests may call it directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lyco_core.errors import InvalidConfigError

from . import Cancelled, JobContext, Outcome, Output


@dataclass(frozen=True)
class OpSpec:
    """An operation's inputs (``name`` → is a list) and options (keyword arguments of the core function)."""

    inputs: dict[str, bool]
    required: tuple[str, ...]
    options: frozenset[str]
    output: str | None  # StoredFile kind of the output, None for read-only operations
    suffix: str = ".safetensors"


OPS: dict[str, OpSpec] = {
    "inspect": OpSpec({"adapter": False}, ("adapter",), frozenset(), None),
    "check": OpSpec({"adapter": False, "base": False}, ("adapter", "base"), frozenset(), None),
    "bake": OpSpec({"base": False, "adapters": True}, ("base", "adapters"),
                   frozenset({"multipliers", "skip_unmatched"}), "model"),
    "merge": OpSpec({"adapters": True, "base": False}, ("adapters",),
                    frozenset({"weights", "rank", "conv_rank", "dtype", "method", "allow_drop"}), "adapter"),
    "rescale": OpSpec({"adapter": False, "base": False}, ("adapter",),
                      frozenset({"multiplier", "alpha", "dtype"}), "adapter"),
    "resize": OpSpec({"adapter": False, "base": False}, ("adapter",),
                     frozenset({"rank", "dynamic", "param", "conv_rank", "dtype", "method", "allow_drop"}), "adapter"),
    "convert": OpSpec({"adapter": False, "base": False, "from_base": False}, ("adapter",),
                      frozenset({"to", "naming", "algo", "rank", "conv_rank", "dora_axis", "dtype", "to_base",
                                 "family", "project_rank", "allow_loss"}), "adapter"),
    "extract": OpSpec({"base": False, "tuned": False}, ("base", "tuned"),
                      frozenset({"rank", "mode", "param", "conv_rank", "tucker", "method", "min_diff",
                                 "text_encoder", "dtype"}), "adapter"),
}


def _dtype(name: Any) -> Any:
    from lyco_core.cli.adapter.common import dtype_of

    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidConfigError(f"options.dtype: {name!r} is not one of bf16, fp16, fp32")
    return dtype_of(name)


def _resolve(ctx: JobContext, name: str, ref: Any) -> str:
    if not isinstance(ref, str) or not ref:
        raise InvalidConfigError(f"inputs.{name}: expected a file id, got {ref!r}")
    p = Path(ref)
    if p.is_absolute():
        return str(p)
    return str(ctx.store_path(ref))


def _inputs(ctx: JobContext, spec: OpSpec, raw: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(spec.inputs))
    if unknown:
        raise InvalidConfigError(f"inputs.{unknown[0]}: not an input of this operation ({', '.join(spec.inputs)})")
    out: dict[str, Any] = {}
    for name, is_list in spec.inputs.items():
        ref = raw.get(name)
        if ref is None:
            if name in spec.required:
                raise InvalidConfigError(f"inputs.{name}: missing")
            continue
        if is_list:
            refs = ref if isinstance(ref, list) else [ref]
            if not refs:
                raise InvalidConfigError(f"inputs.{name}: give at least one file")
            out[name] = [_resolve(ctx, name, r) for r in refs]
        else:
            out[name] = _resolve(ctx, name, ref)
    return out


def _call(op: str, files: dict[str, Any], options: dict[str, Any], output: Path | None,
          progress: Callable[[int, int], None]) -> Any:
    from lyco_core.ops import bake, check, convert, extract, inspect, merge, rescale, resize

    opts = dict(options)
    if "dtype" in opts:
        opts["dtype"] = _dtype(opts["dtype"])
    if op == "inspect":
        return inspect.inspect_adapter(files["adapter"])
    if op == "check":
        return check.check_adapter(files["adapter"], files["base"])
    assert output is not None
    if op == "bake":
        return bake.bake(files["base"], files["adapters"], output, progress_callback=progress, **opts)
    if op == "merge":
        return merge.merge_adapters(files["adapters"], output, base=files.get("base"), progress_callback=progress,
                                    **opts)
    if op == "rescale":
        return rescale.rescale_adapter(files["adapter"], output, base=files.get("base"), callback=progress, **opts)
    if op == "resize":
        return resize.resize_adapter(files["adapter"], output, base=files.get("base"), progress_callback=progress,
                                     **opts)
    if op == "convert":
        if "to" not in opts:
            raise InvalidConfigError("options.to: missing (the target format)")
        return convert.convert_adapter(files["adapter"], output, base=files.get("base"),
                                       from_base=files.get("from_base"), progress_callback=progress, **opts)
    if op == "extract":
        return extract.extract_adapter(files["base"], files["tuned"], output, progress_callback=progress, **opts)
    raise InvalidConfigError(f"op: unknown operation {op!r}")


def _report_json(report: Any) -> Any:
    dump = getattr(report, "model_dump", None)
    return dump(mode="json") if callable(dump) else report


def run(ctx: JobContext) -> Outcome:
    params = ctx.params
    op = params.get("op")
    if op not in OPS:
        raise InvalidConfigError(f"op: unknown operation {op!r} ({', '.join(OPS)})")
    spec = OPS[op]
    raw_inputs = params.get("inputs") or {}
    options = params.get("options") or {}
    if not isinstance(raw_inputs, dict) or not isinstance(options, dict):
        raise InvalidConfigError("inputs/options: expected JSON objects")
    bad = sorted(set(options) - spec.options)
    if bad:
        raise InvalidConfigError(f"options.{bad[0]}: not an option of {op} ({', '.join(sorted(spec.options))})")
    files = _inputs(ctx, spec, raw_inputs)

    output: Path | None = None
    if spec.output is not None:
        name = str(params.get("output_name") or f"{op}{spec.suffix}")
        if Path(name).name != name or name.startswith("."):
            raise InvalidConfigError(f"output_name: {name!r} is not a plain file name")
        out_dir = ctx.work_dir / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        output = out_dir / name
        if output.exists():  # left by an earlier attempt that died before registering it
            import shutil

            if output.is_dir():
                shutil.rmtree(output)
            else:
                output.unlink()

    def progress(done: int, total: int) -> None:
        ctx.event("progress", {"done": done, "total": total, "op": op}, snapshot=True)
        if ctx.should_stop():
            raise Cancelled

    try:
        report = _call(op, files, options, output, progress)
    except Cancelled:
        return Outcome(result={"op": op}, cancelled=True)
    result = {"op": op, "report": _report_json(report)}
    outputs: list[Output] = []
    if output is not None and spec.output is not None and output.exists():
        outputs.append(Output(spec.output, output, output.name, {"op": op}, role="output"))
    return Outcome(result=result, outputs=outputs)


def run_op(job_id: str, settings: Any) -> Any:
    """Run the op job ``job_id`` to its end in this process (claim, run, register the output, final state) and
    return the job row as it ended (see :func:`lyco_worker.tasks.execute`)."""
    from ..tasks import execute

    return execute(job_id, settings)


__all__ = ["OPS", "OpSpec", "run", "run_op"]
