#!/usr/bin/env python
"""Adapter-operation benchmark on the full-size SD 1.5 UNet (random weights, CPU): extract and bake.

Setup (once per work dir; files named by their parameters and reused when present): a diffusers
``UNet2DConditionModel`` with the SD 1.5 config (859.5M parameters) with random weights (every tensor
N(0, 0.02²), seeded per tensor name), written tensor by tensor as ``base-<dtype>/diffusion_pytorch_model.safetensors``
(+ ``config.json``, so the folder is a diffusers model folder); a "tuned" copy in which every selected target
layer W gets a fine-tune-like change ΔW = A·diag(σ)·Bᵀ + noise (A, B orthonormal, 64 components with σᵢ ∝ 1/i,
‖A·diag(σ)·Bᵀ‖ = ``--delta-scale``·‖W‖, dense Gaussian noise of 5 % of that norm; then rounded to the file dtype,
which adds its own rounding noise); and a 278-module LoCon (LoRA dim 32 α 16 on linears and 1×1 convs, dim 16 α 8
on 3×3 convs; random non-zero factors, ‖ΔW‖ ≈ 5–20 % of ‖W‖) made with ``lyco_core.create_network``.

Extract (rank ``--rank`` on attention linears/1×1 convs; with ``--conv-rank`` also the resnet/sampler layers,
3×3 convs at that rank), all contenders on the same layers, each reading both checkpoints from disk and
writing a kohya LoRA file (float32 factors), timed end to end:

* ``extract-lyco``: ``lyco_core.ops.extract.extract_adapter(base_file, tuned_file, out, method=--method)``
  (streams both models layer by layer; randomized SVD where it is as accurate).
* ``extract-lycoris``: what LyCORIS's ``extract_locon`` does: both models loaded whole
  (``safetensors.torch.load_file``), then per layer ``lycoris.utils.extract_linear`` / ``extract_conv``
  (mode ``fixed``; a full ``torch.linalg.svd``) on ΔW in float32. The reference for error and time ratios.
* ``extract-sdscripts``: sd-scripts' ``extract_lora_from_models``: both models loaded whole, per layer
  ``torch.linalg.svd`` (full), keep ``rank`` components, clamp both factors at the 0.99 quantile of their
  entries.

Every contender walks the same target list, skips layers whose ΔW is exactly zero (with ``--layers`` only the
selected layers differ), and its output file is checked afterwards (untimed): per layer the relative
Frobenius error ‖ΔW_lora − ΔW‖/‖ΔW‖, ΔW recomputed from the two files.

Bake (the LoCon into the base UNet file, written as a new safetensors file):

* ``bake-lyco``: ``lyco_core.ops.bake.bake(base_file, [locon], out)`` (streamed; direct I/O; atomic write with
  fsync).
* ``bake-lycoris``: ``UNet2DConditionModel.from_pretrained(base_dir, torch_dtype=dtype)``,
  ``lycoris.kohya.create_network_from_weights(1.0, locon, None, tiny_clip, unet, for_inference=True)``,
  ``network.merge_to(tiny_clip, unet, weights_sd, dtype, "cpu")``, ``save_file(unet.state_dict(), out)``.
* ``bake-readwrite``: ``safetensors.torch.load_file`` + ``save_file`` of the base file (the baseline).
* ``bake-readwrite-fsync``: the same plus ``os.fsync`` of the output, the cost Lyco's atomic write pays.

Lyco's baked file is compared tensor by tensor with LyCORIS's (max relative difference).

Timing: every contender runs ``--rounds`` times (default 2), each time in a fresh child process (this script
with ``--only NAME``), the contenders taking turns and the order rotating every round; the table shows the
minimum. Input files are read once before the first round, so every run sees a warm page cache. Time is the op's
wall clock, after Python and library imports; before each child the parent calls ``sync`` (untimed), so no
contender pays for the write-back of an earlier one's output. Peak MB = peak RSS (psutil, sampled every 5 ms in a
thread; RSS counts mmap-ed file pages while they are mapped) minus the RSS just before the op, max over rounds.

Usage::

    .venv/bin/python bench/ops.py --workdir /tmp/lyco-ops --layers 3             # table on stdout
    .venv/bin/python bench/ops.py --workdir /tmp/lyco-ops --skip-setup --only bake-lyco
    .venv/bin/python bench/ops.py --workdir /tmp/lyco-ops --conv-rank 32 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from train_step import RssSampler  # bench/ is the script's folder, so its modules import

SEED = 1234
MB = 1024 * 1024
#: the SD 1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json); other fields are diffusers' defaults
SD15_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
#: kohya's LoCon set: every Linear/Conv2d inside these blocks (278 modules on SD 1.5)
LOCON_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
#: the LoRA (attention) subset: inside Transformer2DModel only (192 modules on SD 1.5)
ATTN_CLASSES = ("Transformer2DModel",)
LOCON_DIM, LOCON_ALPHA, LOCON_CONV_DIM, LOCON_CONV_ALPHA = 32, 16.0, 16, 8.0
DELTA_COMPONENTS = 64
DELTA_NOISE = 0.05
SDSCRIPTS_CLAMP_QUANTILE = 0.99
EXTRACT = ("extract-lyco", "extract-lycoris", "extract-sdscripts")
BAKE = ("bake-lyco", "bake-lycoris", "bake-readwrite", "bake-readwrite-fsync")
CONTENDERS = EXTRACT + BAKE
#: targets: extract ≥ SPEEDUP_TARGET× faster than the full SVD at no larger error (per-layer error ratio ≤
#: ERR_TOLERANCE, i.e. within 1 %: the full SVD is optimal, so equal means equal up to rounding); bake ≤
#: BAKE_TARGET× read+write; Lyco's baked tensors equal LyCORIS's within BAKE_REL_TOL
SPEEDUP_TARGET = 5.0
ERR_TOLERANCE = 1.01
BAKE_TARGET = 1.5
BAKE_REL_TOL = 1e-3
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}


@dataclass
class Result:
    name: str
    status: str = "ok"  # ok | error
    reason: str = ""
    config: str = ""
    modules: int = 0
    times: list[float] = field(default_factory=list)
    t_min: float = float("nan")
    peaks_mb: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    abs_peak_mb: float = float("nan")  # absolute peak RSS of the child (max over rounds)
    maxrss_mb: float = float("nan")  # ru_maxrss of the child (includes imports), max over rounds
    errors: dict[str, float] = field(default_factory=dict)  # extract: diffusers layer path → rel. error
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def err_mean(self) -> float:
        return sum(self.errors.values()) / len(self.errors) if self.errors else float("nan")

    @property
    def err_max(self) -> float:
        return max(self.errors.values()) if self.errors else float("nan")


# ---------------------------------------------------------------------------------------------------- model
def meta_unet() -> torch.nn.Module:
    """The SD 1.5 UNet on the meta device (shapes and module structure, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_CONFIG)


def target_paths(unet: torch.nn.Module, classes: tuple[str, ...]) -> list[str]:
    """Dotted paths of every Linear/Conv2d inside a block of ``classes`` (named_modules order)."""
    out: dict[str, None] = {}
    for path, block in unet.named_modules():
        if type(block).__name__ in classes:
            for sub, leaf in block.named_modules():
                if isinstance(leaf, (torch.nn.Linear, torch.nn.Conv2d)):
                    out[f"{path}.{sub}" if sub else path] = None
    return list(out)


def layer_kind(path: str) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` → ``attentions.attn2.to_k``."""
    kind = re.sub(r"^.*?(attentions|resnets|downsamplers|upsamplers)\.\d+\.", r"\1.", path)
    return re.sub(r"transformer_blocks\.\d+\.", "", kind)


def select_layers(paths: list[str], per_kind: int | None) -> list[str]:
    """``per_kind`` layers of each kind, evenly spaced over the UNet (so every width is represented)."""
    if per_kind is None:
        return list(paths)
    kinds: dict[str, list[str]] = {}
    for p in paths:
        kinds.setdefault(layer_kind(p), []).append(p)
    keep: set[str] = set()
    for group in kinds.values():
        n = len(group)
        keep |= {group[min(n - 1, int((i + 0.5) * n / per_kind))] for i in range(min(per_kind, n))}
    return [p for p in paths if p in keep]


def kohya_key(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


# ---------------------------------------------------------------------------------------------------- setup
def _gen(name: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 1_000_003 + salt * 7919 + zlib.crc32(name.encode()))


def write_safetensors(
    path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, make: Callable[[str], torch.Tensor]
) -> None:
    """Write a safetensors file tensor by tensor (header first: offsets follow from shapes), atomically.

    Independent of lyco_core's writer so the bench files do not depend on the code under test.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in entries:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in entries:
            t = make(name).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: made {tuple(t.shape)}, header says {shape}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def fine_tune_delta(name: str, w: torch.Tensor, scale: float) -> torch.Tensor:
    """A fine-tune-like ΔW for weight ``w`` (O, I[, k, k]): rank-64 decaying spectrum + dense noise, float32."""
    g = _gen(name, 1)
    o = w.shape[0]
    n = w[0].numel()
    c = min(DELTA_COMPONENTS, o, n)
    a = torch.linalg.qr(torch.randn(o, c, generator=g)).Q
    b = torch.linalg.qr(torch.randn(n, c, generator=g)).Q
    sigma = 1.0 / torch.arange(1, c + 1, dtype=torch.float32)
    low = (a * sigma) @ b.T
    target = scale * float(torch.linalg.vector_norm(w.float()))
    low *= target / float(torch.linalg.vector_norm(low))
    noise = torch.randn(o, n, generator=g) * (DELTA_NOISE * target / math.sqrt(o * n))
    return (low + noise).reshape(w.shape)


@dataclass
class Files:
    base_dir: Path
    base: Path
    tuned: Path
    locon: Path
    out: Path


def files_for(args: argparse.Namespace) -> Files:
    w = Path(args.workdir)
    base_dir = w / f"base-{args.dtype}-s{SEED}"
    sel = "all" if args.layers is None else f"{args.layers}per-kind"
    return Files(
        base_dir=base_dir,
        base=base_dir / "diffusion_pytorch_model.safetensors",
        tuned=w / f"tuned-{args.dtype}-s{SEED}-d{args.delta_scale:g}-{sel}.safetensors",
        locon=w / f"locon-{args.dtype}-s{SEED}.safetensors",
        out=w / "out",
    )


def setup(args: argparse.Namespace) -> Files:
    """Create whatever of the work dir's files is missing (see the module docstring); print their sizes."""
    from safetensors import safe_open

    f = files_for(args)
    dtype = DTYPES[args.dtype]
    f.base_dir.mkdir(parents=True, exist_ok=True)
    f.out.mkdir(parents=True, exist_ok=True)
    unet = meta_unet()
    entries = [(k, tuple(v.shape)) for k, v in unet.state_dict().items()]
    torch.set_num_threads(args.threads)
    if not f.base.exists():
        t0 = time.perf_counter()
        shapes = dict(entries)
        write_safetensors(f.base, entries, dtype, lambda k: torch.randn(shapes[k], generator=_gen(k, 0)) * 0.02)
        unet.save_config(f.base_dir)
        print(f"[setup] wrote {f.base} in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    if not f.tuned.exists():
        t0 = time.perf_counter()
        changed = {p + ".weight" for p in select_layers(target_paths(unet, LOCON_CLASSES), args.layers)}
        with safe_open(str(f.base), "pt") as base:

            def tuned(k: str) -> torch.Tensor:
                w = base.get_tensor(k)
                return w.float() + fine_tune_delta(k, w, args.delta_scale) if k in changed else w

            write_safetensors(f.tuned, entries, dtype, tuned)
        print(
            f"[setup] wrote {f.tuned} ({len(changed)} layers changed) in {time.perf_counter() - t0:.0f}s",
            file=sys.stderr,
            flush=True,
        )
    if not f.locon.exists():
        make_locon(unet, f.locon, dtype)
    for p in (f.base, f.tuned, f.locon):
        print(f"[setup] {p.name}: {p.stat().st_size / MB:,.0f} MB", file=sys.stderr, flush=True)
    return f


def make_locon(unet: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    """278-module LoCon via lyco_core.create_network on the (meta) UNet, with random non-zero factors."""
    import lyco_core as lc

    preset = {"unet": {"target_module": list(LOCON_CLASSES)}}
    net = lc.create_network(
        {"unet": unet},
        algo="lora",
        preset=preset,
        dim=LOCON_DIM,
        alpha=LOCON_ALPHA,
        conv_dim=LOCON_CONV_DIM,
        conv_alpha=LOCON_CONV_ALPHA,
    )
    g = torch.Generator().manual_seed(SEED + 5)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_down" in name:  # (r, I[, k, k]): unit-variance rows over fan-in
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "lora_up" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    net.save(path, dtype=dtype, overwrite=True)
    print(f"[setup] wrote {path} ({len(list(net))} modules)", file=sys.stderr, flush=True)


def warm_cache(paths: list[Path]) -> None:
    """Read files once so that every contender starts with them in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 * MB):
                pass


# ---------------------------------------------------------------------------------------------------- measuring
def rel_error(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> float:
    """‖scale·up·down − ΔW‖_F / ‖ΔW‖_F, factors flattened kohya-style, norms in float64."""
    d = delta.reshape(delta.shape[0], -1).double()
    approx = scale * (up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double())
    return float(torch.linalg.vector_norm(approx - d) / torch.linalg.vector_norm(d))


def file_errors(files: Files, adapter: Path, paths: list[str]) -> dict[str, float]:
    """Per-layer relative error of a kohya LoRA file against ΔW = tuned − base recomputed from the files."""
    from safetensors import safe_open

    out: dict[str, float] = {}
    with (
        safe_open(str(files.base), "pt") as b,
        safe_open(str(files.tuned), "pt") as t,
        safe_open(str(adapter), "pt") as a,
    ):
        keys = set(a.keys())
        for p in paths:
            k = kohya_key(p)
            if f"{k}.lora_up.weight" not in keys:
                if f"{k}.diff" in keys:
                    out[p] = 0.0  # stored whole (exact)
                continue
            delta = t.get_tensor(p + ".weight").float() - b.get_tensor(p + ".weight").float()
            up, down = a.get_tensor(f"{k}.lora_up.weight"), a.get_tensor(f"{k}.lora_down.weight")
            alpha = float(a.get_tensor(f"{k}.alpha")) if f"{k}.alpha" in keys else float(down.shape[0])
            out[p] = rel_error(delta, up.float(), down.float(), alpha / down.shape[0])
    return out


# ---------------------------------------------------------------------------------------------------- contenders
def extract_paths(args: argparse.Namespace) -> list[str]:
    return target_paths(meta_unet(), LOCON_CLASSES if args.conv_rank else ATTN_CLASSES)


def layer_rank(w: torch.Tensor, args: argparse.Namespace) -> int:
    return int(args.conv_rank) if w.ndim == 4 and w.shape[-1] > 1 else int(args.rank)


def run_extract_lyco(files: Files, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from lyco_core.ops.extract import extract_adapter

    report = extract_adapter(
        files.base,
        files.tuned,
        out,
        rank=args.rank,
        conv_rank=args.conv_rank or None,
        method=args.method,
        text_encoder=False,
        overwrite=True,
    )
    methods: dict[str, int] = {}
    for m in report.modules.values():
        methods[m.note or m.algo] = methods.get(m.note or m.algo, 0) + 1
    return {
        "modules": len(report.modules),
        "report_errors": {k: m.rel_error for k, m in report.modules.items()},
        "config": f"extract_adapter(rank={args.rank}, conv_rank={args.conv_rank or None}, method={args.method!r}); "
        f"SVD used per layer: {methods}; dropped (unchanged) {len(report.dropped)}",
    }


def run_extract_full_svd(files: Files, out: Path, args: argparse.Namespace, flavour: str) -> dict[str, Any]:
    """LyCORIS extract_locon / sd-scripts extract_lora_from_models: both models in memory, full SVD per layer."""
    from safetensors.torch import load_file, save_file

    base = load_file(str(files.base))
    tuned = load_file(str(files.tuned))
    result: dict[str, torch.Tensor] = {}
    n = 0
    for p in extract_paths(args):
        w = p + ".weight"
        delta = tuned[w].float() - base[w].float()
        if not bool(delta.abs().max() > 0):
            continue
        r = layer_rank(delta, args)
        if flavour == "lycoris":
            from lycoris.utils import extract_conv, extract_linear

            if delta.ndim == 4:
                res, kind = extract_conv(delta, "fixed", r)
            else:
                res, kind = extract_linear(delta, "fixed", r)
            if kind == "full":
                result[f"{kohya_key(p)}.diff"] = res.contiguous()
                n += 1
                continue
            down, up = res[0], res[1]
        else:  # sd-scripts
            mat = delta.flatten(1)
            u, s, vh = torch.linalg.svd(mat)
            up = u[:, :r] @ torch.diag(s[:r])
            down = vh[:r, :]
            dist = torch.cat([up.flatten(), down.flatten()])
            hi = torch.quantile(dist, SDSCRIPTS_CLAMP_QUANTILE)
            up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
            if delta.ndim == 4:
                up = up.reshape(delta.shape[0], r, 1, 1)
                down = down.reshape(r, *delta.shape[1:])
        k = kohya_key(p)
        result[f"{k}.lora_down.weight"] = down.contiguous()
        result[f"{k}.lora_up.weight"] = up.contiguous()
        result[f"{k}.alpha"] = torch.tensor(float(r))
        n += 1
    save_file(result, str(out))
    how = (
        "lycoris.utils.extract_linear/extract_conv(mode='fixed') (torch.linalg.svd, full_matrices=True)"
        if flavour == "lycoris"
        else f"torch.linalg.svd (full_matrices=True) + clamp at the {SDSCRIPTS_CLAMP_QUANTILE} quantile"
    )
    return {"modules": n, "config": f"load_file ×2; {how}; rank {args.rank}, conv rank {args.conv_rank or '-'}"}


def tiny_clip() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=1000
        )
    )


def run_bake(files: Files, out: Path, args: argparse.Namespace, name: str, te: Any) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    dtype = DTYPES[args.dtype]
    if name == "bake-lyco":
        from lyco_core.ops.bake import bake

        report = bake(files.base, [files.locon], out, overwrite=True)
        return {"modules": len(report.modules), "config": "bake(base_file, [locon], out) (streamed, fsync)"}
    if name == "bake-lycoris":
        from diffusers import UNet2DConditionModel
        from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

        # LyCORIS 4.1.3: create_network_from_weights first builds a default network whose target lists match
        # time_embedding.linear_1 twice on an SD UNet (class "TimestepEmbedding" and the name) and asserts; that
        # default network is discarded, so dropping the class from its list changes nothing else.
        LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = [
            m for m in LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"
        ]
        unet = UNet2DConditionModel.from_pretrained(files.base_dir, torch_dtype=dtype)
        network, weights_sd = create_network_from_weights(1.0, str(files.locon), None, te, unet, for_inference=True)
        network.merge_to(te, unet, weights_sd, dtype, "cpu")
        save_file(unet.state_dict(), str(out))
        return {
            "modules": len(network.unet_loras),
            "config": "from_pretrained + create_network_from_weights(for_inference=True) + merge_to + save_file",
        }
    sd = load_file(str(files.base))
    save_file(sd, str(out))
    if name == "bake-readwrite-fsync":
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {"modules": 0, "config": "load_file + save_file" + (" + fsync" if name.endswith("fsync") else "")}


def run_contender(name: str, args: argparse.Namespace) -> Result:
    """Run one contender once in this process: the op timed and memory-sampled, then (untimed) its checks."""
    res = Result(name=name)
    torch.set_num_threads(args.threads)
    files = files_for(args)
    out = files.out / f"{name}.safetensors"
    out.unlink(missing_ok=True)
    te = None
    # import everything the op needs before the base RSS is taken: imports are not the op's memory
    import diffusers  # noqa: F401
    import lycoris  # noqa: F401
    import safetensors.torch  # noqa: F401

    import lyco_core.ops.bake
    import lyco_core.ops.extract  # noqa: F401

    if name == "bake-lycoris":
        import logging

        logging.getLogger("LyCORIS").setLevel(logging.WARNING)
        te = tiny_clip()
    gc.collect()
    try:
        with RssSampler(interval=0.005) as sampler:
            t0 = time.perf_counter()
            if name == "extract-lyco":
                info = run_extract_lyco(files, out, args)
            elif name in ("extract-lycoris", "extract-sdscripts"):
                info = run_extract_full_svd(files, out, args, name.split("-")[1])
            elif name in BAKE:
                info = run_bake(files, out, args, name, te)
            else:
                raise SystemExit(f"unknown contender {name!r}: use one of {', '.join(CONTENDERS)}")
            res.times.append(time.perf_counter() - t0)
    except Exception as e:
        res.status, res.reason = "error", f"{type(e).__name__}: {e}".splitlines()[0][:300]
        traceback.print_exc()
        return res
    res.peaks_mb = [(sampler.peak - sampler.base) / MB]
    res.abs_peak_mb = sampler.peak / MB
    res.maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res.modules, res.config = info["modules"], info["config"]
    del info["modules"], info["config"]
    gc.collect()
    if name in EXTRACT and args.errors:
        res.errors = file_errors(files, out, extract_paths(args))
        if "report_errors" in info:  # Lyco's own per-module rel_error vs the bench's recomputation
            rep = info.pop("report_errors")
            diffs = [abs(rep[kohya_key(p)] - e) for p, e in res.errors.items() if kohya_key(p) in rep]
            res.extra["report_vs_bench_max_abs_diff"] = max(diffs) if diffs else float("nan")
    info.pop("report_errors", None)
    if name in BAKE:
        res.extra["out_mb"] = out.stat().st_size / MB
        if name not in ("bake-lyco", "bake-lycoris"):
            out.unlink()  # the baselines' copies are not needed afterwards
    res.extra.update(info)
    res.t_min = min(res.times)
    res.peak_mb = max(res.peaks_mb)
    return res


def run_child(name: str, args: argparse.Namespace, errors: bool) -> Result:
    """Run one contender in a fresh interpreter and collect its Result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--only",
            name,
            "--skip-setup",
            "--workdir",
            args.workdir,
            "--dtype",
            args.dtype,
            "--rank",
            str(args.rank),
            "--conv-rank",
            str(args.conv_rank),
            "--method",
            args.method,
            "--threads",
            str(args.threads),
            "--delta-scale",
            str(args.delta_scale),
            "--result",
            result,
        ]
        if args.layers is not None:
            cmd += ["--layers", str(args.layers)]
        if errors:
            cmd.append("--errors")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            return Result(name=name, status="error", reason=f"timeout {args.child_timeout}s")
        if os.path.exists(result):
            with open(result) as f:
                return Result(**json.load(f))
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return Result(name=name, status="error", reason=tail[0][:300])


def merge_rounds(acc: Result | None, r: Result) -> Result:
    if acc is None or acc.status != "ok":
        return r
    if r.status != "ok":
        acc.reason = f"a later round failed: {r.reason}"
        return acc
    acc.times += r.times
    acc.peaks_mb += r.peaks_mb
    acc.t_min, acc.peak_mb = min(acc.times), max(acc.peaks_mb)
    acc.abs_peak_mb, acc.maxrss_mb = max(acc.abs_peak_mb, r.abs_peak_mb), max(acc.maxrss_mb, r.maxrss_mb)
    return acc


# ---------------------------------------------------------------------------------------------------- checks
def compare_bakes(files: Files) -> dict[str, Any]:
    """Lyco's baked file vs LyCORIS's merged state dict, tensor by tensor (one tensor in memory at a time)."""
    from safetensors import safe_open

    a_path, b_path = files.out / "bake-lyco.safetensors", files.out / "bake-lycoris.safetensors"
    if not (a_path.exists() and b_path.exists()):
        return {}
    worst_w, worst_d, worst_key, changed, identical, dtypes = 0.0, 0.0, "", 0, 0, set()
    with safe_open(str(a_path), "pt") as a, safe_open(str(b_path), "pt") as b, safe_open(str(files.base), "pt") as base:
        if set(a.keys()) != set(b.keys()):
            return {"error": f"key sets differ: {len(set(a.keys()) ^ set(b.keys()))} keys"}
        for k in a.keys():  # noqa: SIM118 (safe_open is not iterable)
            ta, tb, t0 = a.get_tensor(k), b.get_tensor(k), base.get_tensor(k)
            dtypes.add(str(ta.dtype))
            if torch.equal(ta, tb):
                identical += 1
            fa, fb, f0 = ta.float(), tb.float(), t0.float()
            if not torch.equal(tb, t0):
                changed += 1
            nb = float(torch.linalg.vector_norm(fb))
            diff = float(torch.linalg.vector_norm(fa - fb))
            rel_w = diff / nb if nb else diff
            nd = float(torch.linalg.vector_norm(fb - f0))
            rel_d = diff / nd if nd else (0.0 if diff == 0 else float("inf"))
            if rel_w > worst_w:
                worst_w, worst_key = rel_w, k
            worst_d = max(worst_d, rel_d)
    return {
        "max_rel_diff": worst_w,
        "worst_key": worst_key,
        "max_rel_diff_of_delta": worst_d,
        "tensors_changed_by_lycoris": changed,
        "tensors_identical": identical,
        "dtypes": sorted(dtypes),
    }


# ---------------------------------------------------------------------------------------------------- report
def verdicts(by: dict[str, Result], bake_check: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    ly, full = by.get("extract-lyco"), by.get("extract-lycoris")
    if ly and full and ly.status == "ok" and full.status == "ok":
        misses = []
        speed = full.t_min / ly.t_min
        if speed < SPEEDUP_TARGET:
            misses.append(f"{speed:.1f}x<{SPEEDUP_TARGET:g}x")
        ratio = max_err_ratio(ly, full)
        if not ratio <= ERR_TOLERANCE:
            misses.append(f"err {ratio:.4f}x full")
        if set(ly.errors) != set(full.errors):
            misses.append("LAYER SETS DIFFER")
        out["extract-lyco"] = "PASS" if not misses else "MISS: " + ", ".join(misses)
    lb, rw = by.get("bake-lyco"), by.get("bake-readwrite")
    if lb and rw and lb.status == "ok" and rw.status == "ok":
        misses = []
        ratio = lb.t_min / rw.t_min
        if ratio > BAKE_TARGET:
            misses.append(f"{ratio:.2f}x>{BAKE_TARGET:g}x read+write")
        lc = by.get("bake-lycoris")
        if lc and lc.status == "ok" and lb.peak_mb > lc.peak_mb:
            misses.append("mem>lycoris")
        if bake_check and not bake_check.get("max_rel_diff", 1.0) <= BAKE_REL_TOL:
            misses.append(f"differs from LyCORIS ({bake_check.get('max_rel_diff', bake_check.get('error'))})")
        out["bake-lyco"] = "PASS" if not misses else "MISS: " + ", ".join(misses)
    return out


def max_err_ratio(r: Result, ref: Result) -> float:
    common = [p for p in r.errors if p in ref.errors and ref.errors[p] > 0]
    return max((r.errors[p] / ref.errors[p] for p in common), default=float("nan"))


def mean_err_ratio(r: Result, ref: Result) -> float:
    common = [p for p in r.errors if p in ref.errors and ref.errors[p] > 0]
    return sum(r.errors[p] / ref.errors[p] for p in common) / len(common) if common else float("nan")


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print()


def print_tables(results: list[Result], args: argparse.Namespace, bake_check: dict[str, Any]) -> None:
    by = {r.name: r for r in results}
    verdict = verdicts(by, bake_check)
    ex = [r for r in results if r.name in EXTRACT]
    if ex:
        full = by.get("extract-lycoris")
        ok_full = full is not None and full.status == "ok"
        rows: list[tuple[str, ...]] = []
        for r in ex:
            if r.status != "ok":
                rows.append((r.name, "-", r.status, "-", "-", "-", "-", "-", "-"))
                continue
            speed = f"{full.t_min / r.t_min:.2f}" if ok_full and full else "-"
            ratio = f"{max_err_ratio(r, full):.4f}" if ok_full and full and r.errors else "-"
            rows.append(
                (
                    r.name,
                    str(r.modules),
                    f"{r.t_min:.1f}",
                    speed + (f" (>= {SPEEDUP_TARGET:g})" if r.name == "extract-lyco" else ""),
                    f"{r.err_mean:.4f}",
                    f"{r.err_max:.4f}",
                    ratio,
                    f"{r.peak_mb:,.0f}",
                    verdict.get(r.name, "-"),
                )
            )
        print(
            f"EXTRACT rank {args.rank}, conv rank {args.conv_rank or '- (attention layers only)'}, "
            f"layers: {'all' if args.layers is None else f'{args.layers} per kind'}, dtype {args.dtype}"
        )
        _table(
            (
                "contender",
                "modules",
                "time s",
                "x faster than full SVD",
                "err mean",
                "err max",
                "err/full max",
                "peak MB",
                "verdict",
            ),
            rows,
        )
    bk = [r for r in results if r.name in BAKE]
    if bk:
        rw = by.get("bake-readwrite")
        ok_rw = rw is not None and rw.status == "ok"
        rows = []
        for r in bk:
            if r.status != "ok":
                rows.append((r.name, "-", r.status, "-", "-", "-"))
                continue
            ratio = f"{r.t_min / rw.t_min:.2f}" if ok_rw and rw else "-"
            rows.append(
                (
                    r.name,
                    str(r.modules) if r.modules else "-",
                    f"{r.t_min:.1f}",
                    ratio + (f" (<= {BAKE_TARGET:g})" if r.name == "bake-lyco" else ""),
                    f"{r.peak_mb:,.0f}",
                    verdict.get(r.name, "-"),
                )
            )
        print(
            f"BAKE 278-module LoCon (dim {LOCON_DIM}/α {LOCON_ALPHA:g}, conv {LOCON_CONV_DIM}/α "
            f"{LOCON_CONV_ALPHA:g}) into the SD 1.5 UNet, dtype {args.dtype}"
        )
        _table(("contender", "modules", "time s", "x read+write", "peak MB", "verdict"), rows)
    print(
        f"torch {torch.__version__}, {args.threads} threads; time = min over {args.rounds} round(s), each a fresh "
        "process, warm page cache; peak MB = sampled RSS peak − RSS before the op (max over rounds)"
    )
    full = by.get("extract-lycoris")
    for r in ex:
        if r.status == "ok" and full is not None and full.status == "ok" and r.errors and r is not full:
            print(
                f"  {r.name}: mean per-layer error ratio to full SVD {mean_err_ratio(r, full):.4f}; "
                f"layers {len(r.errors)} (same set as full SVD: {set(r.errors) == set(full.errors)})"
            )
    if bake_check:
        if "error" in bake_check:
            print(f"  bake check: {bake_check['error']}")
        else:
            print(
                f"  bake check, Lyco vs LyCORIS: max rel diff ‖a−b‖/‖b‖ {bake_check['max_rel_diff']:.2e} "
                f"(<= {BAKE_REL_TOL:g}; {bake_check['worst_key']}), relative to the merged ΔW "
                f"{bake_check['max_rel_diff_of_delta']:.2e}; tensors changed by LyCORIS "
                f"{bake_check['tensors_changed_by_lycoris']}, bitwise identical "
                f"{bake_check['tensors_identical']}; dtypes {bake_check['dtypes']}"
            )
    for r in results:
        if r.config or r.reason:
            extra = {k: v for k, v in r.extra.items() if k in ("report_vs_bench_max_abs_diff",)}
            tail = f" | {extra}" if extra else ""
            print(f"  {r.name}: {r.config}{' | ' if r.config and r.reason else ''}{r.reason}{tail}")


def write_json(path: str, results: list[Result], args: argparse.Namespace, bake_check: dict[str, Any]) -> None:
    by = {r.name: r for r in results}
    payload = {
        "args": {k: v for k, v in vars(args).items() if k != "result"},
        "torch": torch.__version__,
        "verdicts": verdicts(by, bake_check),
        "bake_check": bake_check,
        "results": [asdict(r) | {"err_mean": r.err_mean, "err_max": r.err_max} for r in results],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="where the models and outputs live (default: a new temp dir, removed after)")
    ap.add_argument("--skip-setup", action="store_true", help="reuse the work dir's files; create nothing")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the UNet files")
    ap.add_argument("--rank", type=int, default=32, help="extract rank for linears and 1×1 convs")
    ap.add_argument(
        "--conv-rank",
        type=int,
        default=0,
        help="also extract the resnet/sampler layers, 3×3 convs at this rank (0: attention layers only)",
    )
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help="only N layers of each kind (evenly spaced over the UNet) differ in the tuned model "
        "(default: all target layers)",
    )
    ap.add_argument("--method", choices=("auto", "full", "randomized"), default="auto", help="Lyco's SVD method")
    ap.add_argument("--delta-scale", type=float, default=1e-3, help="‖low-rank ΔW‖ / ‖W‖ of the tuned model")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset to run")
    ap.add_argument("--only", help="run one contender in this process: " + ", ".join(CONTENDERS))
    ap.add_argument("--rounds", type=int, default=2, help="runs per contender (the table shows the minimum time)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--json", help="write all results (per-layer errors included) as JSON")
    ap.add_argument("--child-timeout", type=int, default=3600, help="seconds per contender process")
    ap.add_argument("--errors", action="store_true", help=argparse.SUPPRESS)  # child: measure extract errors
    ap.add_argument("--result", help=argparse.SUPPRESS)  # child → parent result file
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.rank < 1 or args.conv_rank < 0 or (args.layers is not None and args.layers < 1):
        ap.error("--rounds, --rank and --layers must be ≥ 1, --conv-rank ≥ 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = None
    if args.workdir is None:
        if args.skip_setup:
            raise SystemExit("--skip-setup needs --workdir")
        tmp = tempfile.mkdtemp(prefix="lyco-bench-ops-")
        args.workdir = tmp
    try:
        files = files_for(args) if args.skip_setup else setup(args)
        missing = [p for p in (files.base, files.tuned, files.locon) if not p.exists()]
        if missing:
            raise SystemExit(f"--skip-setup: missing {', '.join(map(str, missing))}")
        if args.only:
            if args.only not in CONTENDERS:
                raise SystemExit(f"unknown contender {args.only!r}: use one of {', '.join(CONTENDERS)}")
            args.rounds = 1
            if not args.result:
                args.errors = True
            res = run_contender(args.only, args)
            if args.result:
                with open(args.result, "w") as f:
                    json.dump(asdict(res), f)
            else:
                print_tables([res], args, {})
            if args.json:
                write_json(args.json, [res], args, {})
            return 0
        names = [n.strip() for n in args.contenders.split(",") if n.strip()]
        bad = [n for n in names if n not in CONTENDERS]
        if bad:
            raise SystemExit(f"--contenders: unknown {bad}; choose from {', '.join(CONTENDERS)}")
        warm_cache([files.base, files.tuned, files.locon])
        acc: dict[str, Result | None] = dict.fromkeys(names)
        for rnd in range(args.rounds):
            k = rnd % len(names)
            for name in names[k:] + names[:k]:
                os.sync()  # untimed: no contender pays for an earlier one's pending write-back
                t0 = time.perf_counter()
                r = run_child(name, args, errors=rnd == 0)
                summary = f"{r.t_min:.1f}s, peak {r.peak_mb:,.0f} MB" if r.status == "ok" else r.reason
                print(
                    f"[round {rnd + 1}] {name}: {summary} — {time.perf_counter() - t0:.0f}s wall",
                    file=sys.stderr,
                    flush=True,
                )
                acc[name] = merge_rounds(acc[name], r)
        results = [r for r in acc.values() if r is not None]
        bake_check = compare_bakes(files) if {"bake-lyco", "bake-lycoris"} <= set(names) else {}
        print_tables(results, args, bake_check)
        if args.json:
            write_json(args.json, results, args, bake_check)
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
