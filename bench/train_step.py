#!/usr/bin/env python
"""Training-step benchmark: Lyco vs LyCORIS 4.1.3 vs peft on the SD 1.5 UNet at 1/4 width (CPU).

One step = forward + MSE loss + backward. Nothing is optimised (no optimizer step); only adapter parameters
require grad. The ``frozen`` baseline is the same UNet with no adapter: its noisy-latent input requires grad
so that activation gradients flow through the whole network, and no parameter requires grad.

Model: diffusers ``UNet2DConditionModel`` with the SD 1.5 config except block_out_channels (80, 160, 320, 320)
(SD 1.5's 320/640/1280/1280 divided by 4) and norm_num_groups 16 (32 does not divide 80; 16 divides every
channel count of the model, including the up blocks' concatenations 240 and 480). attention_head_dim 8 keeps SD
1.5's meaning in diffusers (8 heads), so head dims are 10/20/40. Random weights (fixed seed), latent
(1, 4, 32, 32), encoder_hidden_states (1, 77, 768), timestep 500, ``torch.set_num_threads(2)`` by default.

Targets (identical for the three libraries, checked by hashing the targeted module paths): every nn.Linear and
nn.Conv2d inside ``Transformer2DModel``, ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D`` blocks, i.e.
LyCORIS's "full" preset on the UNet *without* conv_in, conv_out and time_embedding (norm layers untouched).

Algorithms: LoRA dim 8 α 4; LoHa dim 4 α 2; LoKr "full dim": dim 100000 so w2 is always a full matrix, factor 8,
w1 full (no decompose_both), α = dim (scale 1). Conv layers use the same dim/α as linear ones. Each library
runs its own default forward mode (bypass or merged ΔW), as a user would get it.

Every contender runs in its own fresh child process (this script with ``--only NAME``). Time = min over
``--steps`` timed steps after ``--warmup`` warm-ups. Peak MB = peak RSS (psutil, sampled every 2 ms in a
thread during adapter creation and the warm-up steps) minus the RSS after the UNet and its inputs were built,
so it counts the adapter's tensors plus the step's activations and gradients. The child's ``ru_maxrss`` minus
that same base is recorded in the JSON as a cross-check.

Usage::

    .venv/bin/python bench/train_step.py                       # everything, table on stdout
    .venv/bin/python bench/train_step.py --algos lora --steps 3 --json out.json
    .venv/bin/python bench/train_step.py --only lyco-loha      # one contender, in this process
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")  # LyCORIS's eager torch path (no custom kernels)

import torch
import torch.nn.functional as F
from torch import nn

SEED = 1234
TIMESTEP = 500
TARGET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
LIBS = ("lyco", "lycoris", "peft")
ALGOS = ("lora", "loha", "lokr")
LOKR_DIM = 100_000
#: algo → (dim, alpha, LoKr factor or None); the same numbers for linear and conv layers
SETTINGS: dict[str, tuple[int, float, int | None]] = {
    "lora": (8, 4.0, None),
    "loha": (4, 2.0, None),
    "lokr": (LOKR_DIM, float(LOKR_DIM), 8),
}
#: Lyco step time must stay within this multiple of the frozen step
TIME_TARGETS = {"lora": 1.12, "loha": 1.6, "lokr": 1.3}
MB = 1024 * 1024


@dataclass
class Result:
    name: str
    lib: str
    algo: str
    status: str = "ok"  # ok | n/a | error
    reason: str = ""
    config: str = ""
    modules: int = 0
    params: int = 0
    paths_sha1: str = ""
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per step (less load-sensitive)
    t_min: float = float("nan")
    t_median: float = float("nan")
    base_rss_mb: float = float("nan")
    peak_mb: float = float("nan")
    maxrss_mb: float = float("nan")
    baseline_s: float = float("nan")  # the frozen step time measured alongside this one (interleaved mode)

    def ratio_to(self, frozen: Result | None) -> float:
        """Step time over the frozen step time measured under the same conditions."""
        if self.baseline_s == self.baseline_s:  # not NaN
            return self.t_min / self.baseline_s
        if frozen is None or frozen.status != "ok":
            return float("nan")
        return self.t_min / frozen.t_min


# ---------------------------------------------------------------------------------------------------- model
def build_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(80, 160, 320, 320),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=16,
        norm_eps=1e-5,
        act_fn="silu",
        center_input_sample=False,
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        mid_block_scale_factor=1,
    )


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    return {
        "latent": torch.randn(1, 4, 32, 32, generator=g),
        "ehs": torch.randn(1, 77, 768, generator=g),
        "target": torch.randn(1, 4, 32, 32, generator=g),
        "t": torch.tensor([TIMESTEP]),
    }


def target_paths(unet: nn.Module) -> list[str]:
    """Dotted paths of every Linear/Conv2d inside a block of TARGET_CLASSES (named_modules order)."""
    out: dict[str, None] = {}
    for path, block in unet.named_modules():
        if type(block).__name__ not in TARGET_CLASSES:
            continue
        for sub, leaf in block.named_modules():
            if isinstance(leaf, (nn.Linear, nn.Conv2d)):
                out[f"{path}.{sub}" if sub else path] = None
    return list(out)


def paths_digest(paths: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(paths)).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------- adapters
# Each builder attaches adapters to `unet` (whose own parameters are frozen already) and returns
# (trainable parameters, targeted module paths, a one-line description of the configuration).
Built = tuple[list[nn.Parameter], list[str], str]


def build_lyco(unet: nn.Module, algo: str) -> Built:
    import lyco_core as lc

    dim, alpha, factor = SETTINGS[algo]
    preset = lc.load_preset({"name": "bench", "enable_conv": True, "unet": {"target_module": list(TARGET_CLASSES)}})
    extra: dict[str, Any] = {} if factor is None else {"factor": factor}
    net = lc.create_network(
        unet, algo=algo, preset=preset, dim=dim, alpha=alpha, conv_dim=dim, conv_alpha=alpha, **extra
    )
    net.apply()
    net.train()
    where = {id(m): p for p, m in unet.named_modules()}
    paths = [where[id(m.base)] for m in net]
    bypass = sorted({str(m.bypass_mode) for m in net})
    desc = (
        f"create_network(algo={algo}, dim={dim}, alpha={alpha:g}, conv_dim={dim}, conv_alpha={alpha:g}"
        f"{f', factor={factor}' if factor else ''}); bypass={'/'.join(bypass)}"
    )
    return net.trainable_parameters(), paths, desc


def build_lycoris(unet: nn.Module, algo: str) -> Built:
    import logging

    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    dim, alpha, factor = SETTINGS[algo]
    # create_lycoris re-applies its default "full" preset, whose UNet lists live under unet_target_* keys that
    # LycorisNetwork ignores, so these class-level targets stay in force (checked by the paths digest).
    LycorisNetwork.apply_preset(
        {"enable_conv": True, "target_module": list(TARGET_CLASSES), "target_name": [], "exclude_name": []}
    )
    extra: dict[str, Any] = {} if factor is None else {"factor": factor}
    network = create_lycoris(
        unet, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo, conv_dim=dim, conv_alpha=alpha, **extra
    )
    network.apply_to()
    network.train()
    where = {id(m): p for p, m in unet.named_modules()}
    paths = [where[id(m.org_module[0])] for m in network.loras]
    params = [p for p in network.parameters() if p.requires_grad]
    desc = (
        f"create_lycoris(algo={algo}, linear_dim={dim}, linear_alpha={alpha:g}, conv_dim={dim}, "
        f"conv_alpha={alpha:g}{f', factor={factor}' if factor else ''}); bypass_mode=False (default)"
    )
    return params, paths, desc


def build_peft(unet: nn.Module, algo: str) -> Built:
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    dim, alpha, factor = SETTINGS[algo]
    targets = target_paths(unet)
    config: Any
    if algo == "lora":
        config = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
        desc = f"LoraConfig(r={dim}, lora_alpha={alpha:g})"
    elif algo == "loha":
        config = LoHaConfig(r=dim, alpha=alpha, target_modules=targets)
        desc = f"LoHaConfig(r={dim}, alpha={alpha:g})"
    else:
        # r ≥ max(out_k, in_n)/2 makes peft keep w2 full, as LyCORIS does for a huge dim; decompose_both=False
        # keeps w1 full; scale α/r = 1.
        config = LoKrConfig(
            r=dim, alpha=int(alpha), decompose_factor=factor, decompose_both=False, target_modules=targets
        )
        desc = f"LoKrConfig(r={dim}, alpha={int(alpha)}, decompose_factor={factor}, decompose_both=False)"
    inject_adapter_in_model(config, unet)
    paths = [p for p, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    params = [p for p in unet.parameters() if p.requires_grad]
    return params, paths, desc + f" targets={len(targets)} explicit paths; inject_adapter_in_model"


def _import_lyco() -> None:
    import lyco_core  # noqa: F401


def _import_lycoris() -> None:
    import lycoris  # noqa: F401


def _import_peft() -> None:
    import peft  # noqa: F401


PRELOAD: dict[str, Callable[[], None]] = {
    "frozen": lambda: None,
    "lyco": _import_lyco,
    "lycoris": _import_lycoris,
    "peft": _import_peft,
}
BUILDERS: dict[str, Callable[[nn.Module, str], Built]] = {
    "lyco": build_lyco,
    "lycoris": build_lycoris,
    "peft": build_peft,
}


# ---------------------------------------------------------------------------------------------------- one contender
class RssSampler:
    """Peak RSS of this process, sampled in a daemon thread (also used by bench/ops.py)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.base = self.proc.memory_info().rss  # RSS when the sampler was made
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def split_name(name: str) -> tuple[str, str]:
    if name == "frozen":
        return "frozen", "-"
    lib, _, algo = name.partition("-")
    if lib not in LIBS or algo not in ALGOS:
        raise SystemExit(f"unknown contender {name!r}: use frozen or <{'|'.join(LIBS)}>-<{'|'.join(ALGOS)}>")
    return lib, algo


def run_contender(name: str, steps: int, warmup: int, threads: int) -> Result:
    """Build, warm up and time one contender in this process."""
    import psutil

    lib, algo = split_name(name)
    res = Result(name=name, lib=lib, algo=algo)
    torch.set_num_threads(threads)
    unet = build_unet()
    unet.requires_grad_(False)
    unet.train()
    inp = make_inputs()
    ref_paths = target_paths(unet)
    try:  # import the library before the base RSS is taken: its import is not the step's memory
        PRELOAD[lib]()
    except Exception as e:
        res.status, res.reason = "n/a", f"import failed: {type(e).__name__}: {e}".splitlines()[0][:300]
        return res
    gc.collect()
    base = psutil.Process().memory_info().rss
    res.base_rss_mb = base / MB
    try:
        with RssSampler() as sampler:
            if lib == "frozen":
                params: list[nn.Parameter] = []
                paths, res.config = (
                    ref_paths,
                    "no adapter; latent input requires grad; modules = the reference selection",
                )
            else:
                torch.manual_seed(SEED + 2)
                params, paths, res.config = BUILDERS[lib](unet, algo)
            x = inp["latent"].clone().requires_grad_(lib == "frozen")

            def step() -> None:
                for p in params:
                    p.grad = None
                x.grad = None
                out = unet(x, inp["t"], encoder_hidden_states=inp["ehs"], return_dict=False)[0]
                F.mse_loss(out, inp["target"]).backward()

            for _ in range(warmup):
                step()
        res.peak_mb = (sampler.peak - base) / MB
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            res.times.append(time.perf_counter() - t0)
            res.cpu_times.append(time.process_time() - c0)
    except NotImplementedError as e:
        res.status, res.reason = "n/a", f"NotImplementedError: {e}".strip()
        return res
    except Exception as e:
        res.status, res.reason = "error", f"{type(e).__name__}: {e}".splitlines()[0][:300]
        traceback.print_exc()
        return res
    res.modules, res.paths_sha1 = len(paths), paths_digest(paths)
    res.params = sum(p.numel() for p in params)
    if lib != "frozen" and not params:
        res.status, res.reason = "error", "no trainable parameter"
        return res
    if lib != "frozen" and any(p.grad is None for p in params):
        missing = sum(p.grad is None for p in params)
        res.reason = f"warning: {missing} trainable tensor(s) got no gradient"
    res.t_min = min(res.times)
    res.t_median = sorted(res.times)[len(res.times) // 2]
    res.maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB - res.base_rss_mb
    return res


def run_child(name: str, args: argparse.Namespace) -> Result:
    """Run one contender in a fresh interpreter and collect its Result."""
    lib, algo = split_name(name)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--only",
            name,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
            "--result",
            out,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            return Result(name=name, lib=lib, algo=algo, status="error", reason=f"timeout {args.child_timeout}s")
        if os.path.exists(out):
            with open(out) as f:
                return Result(**json.load(f))
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return Result(name=name, lib=lib, algo=algo, status="error", reason=tail[0][:300])


def interleaved_times(names: list[str], steps: int, warmup: int, threads: int) -> dict[str, list[float]]:
    """Time every contender in this one process, one step each in turn (rotating the order every round).

    The machines are shared (CPU steal of 25% was seen), so back-to-back runs drift by tens of percent;
    interleaving exposes every contender to the same drift, and the min over rounds is compared.
    """
    torch.set_num_threads(threads)
    steppers: dict[str, Callable[[], None]] = {}
    for name in names:
        lib, algo = split_name(name)
        unet = build_unet()
        unet.requires_grad_(False)
        unet.train()
        inp = make_inputs()
        torch.manual_seed(SEED + 2)
        params = [] if lib == "frozen" else BUILDERS[lib](unet, algo)[0]
        x = inp["latent"].clone().requires_grad_(lib == "frozen")

        def step(unet: nn.Module = unet, inp: dict[str, torch.Tensor] = inp, x: torch.Tensor = x,
                 params: list[nn.Parameter] = params) -> None:
            for p in params:
                p.grad = None
            x.grad = None
            out = unet(x, inp["t"], encoder_hidden_states=inp["ehs"], return_dict=False)[0]
            F.mse_loss(out, inp["target"]).backward()

        for _ in range(warmup):
            step()
        steppers[name] = step
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            steppers[name]()
            times[name].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------------- report
def verdicts(results: list[Result]) -> dict[str, str]:
    """Verdict per Lyco row against the targets; peers and the baseline get none."""
    by = {r.name: r for r in results}
    frozen = by.get("frozen")
    out: dict[str, str] = {}
    for r in results:
        if r.lib != "lyco" or r.status != "ok":
            continue
        misses: list[str] = []
        limit = TIME_TARGETS[r.algo]
        has_base = frozen is not None and frozen.status == "ok"
        if has_base:
            ratio = r.ratio_to(frozen)
            if ratio > limit:
                misses.append(f"{ratio:.2f}x>{limit}x")
        peers = [by[n] for n in (f"lycoris-{r.algo}", f"peft-{r.algo}") if n in by and by[n].status == "ok"]
        if not has_base and not peers:
            continue  # nothing to compare with (e.g. --only)
        slower = [p.lib for p in peers if r.t_min >= p.t_min]
        if slower:
            misses.append("not faster than " + "+".join(slower))
        if peers:
            best_mem = min(peers, key=lambda p: p.peak_mb)
            if r.peak_mb > best_mem.peak_mb:
                misses.append(f"mem>{best_mem.lib}")
        if any(p.paths_sha1 != r.paths_sha1 or p.modules != r.modules for p in peers):
            misses.append("MODULE SETS DIFFER")
        out[r.name] = "PASS" if not misses else "MISS: " + ", ".join(misses)
    return out


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    by = {r.name: r for r in results}
    frozen = by.get("frozen")
    verdict = verdicts(results)
    head = ("contender", "algo", "modules", "params", "s/step(min)", "x frozen", "peak MB", "verdict")
    rows: list[tuple[str, ...]] = []
    for r in results:
        if r.status != "ok":
            rows.append((r.name, r.algo, "-", "-", r.status, "-", "-", "-"))
            continue
        ratio = r.ratio_to(frozen)
        target = f" (<= {TIME_TARGETS[r.algo]})" if r.lib == "lyco" else ""
        rows.append(
            (
                r.name,
                r.algo,
                str(r.modules),
                f"{r.params:,}",
                f"{r.t_min:.3f}",
                f"{ratio:.2f}{target}",
                f"{r.peak_mb:.0f}",
                verdict.get(r.name, "-"),
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print()
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps; "
        "peak MB = sampled RSS peak − RSS after building the UNet"
    )
    ref = frozen.paths_sha1 if frozen is not None and frozen.status == "ok" else None
    for algo in dict.fromkeys(r.algo for r in results if r.lib != "frozen"):
        rs = [r for r in results if r.algo == algo and r.status == "ok"]
        counts = ", ".join(f"{r.lib} {r.modules}" for r in rs)
        same = len({r.paths_sha1 for r in rs} | ({ref} if ref else set())) == 1
        print(
            f"{algo}: modules per library: {counts} -> "
            f"{'identical module sets' if same else 'MODULE SETS DIFFER'}"
            f"{f' (= reference selection, {frozen.modules} modules)' if same and ref and frozen else ''}"
        )
    for r in results:
        if r.config or r.reason:
            print(f"  {r.name}: {r.config}{' | ' if r.config and r.reason else ''}{r.reason}")


# ---------------------------------------------------------------------------------------------------- main
def write_json(path: str, results: list[Result], args: argparse.Namespace) -> None:
    payload = {
        "args": {k: v for k, v in vars(args).items() if k != "result"},
        "torch": torch.__version__,
        "verdicts": verdicts(results),
        "results": [asdict(r) for r in results],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset of lora,loha,lokr")
    ap.add_argument("--only", help="run one contender in this process: frozen or <lyco|lycoris|peft>-<algo>")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per contender (min is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per contender")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--child-timeout", type=int, default=900, help="seconds per contender process")
    ap.add_argument(
        "--separate",
        action="store_true",
        help="time each contender in its own process only (default: memory in separate processes, time "
        "interleaved in one process, which is robust to the drift of a shared machine)",
    )
    ap.add_argument("--result", help=argparse.SUPPRESS)  # child → parent result file
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be ≥ 1 and --warmup ≥ 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.only:
        res = run_contender(args.only, args.steps, args.warmup, args.threads)
        if args.result:
            with open(args.result, "w") as f:
                json.dump(asdict(res), f)
        else:
            print_table([res], args)
        if args.json:
            write_json(args.json, [res], args)
        return 0
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    bad = [a for a in algos if a not in ALGOS]
    if bad:
        raise SystemExit(f"--algos: unknown {bad}; choose from {', '.join(ALGOS)}")
    names = ["frozen"] + [f"{lib}-{algo}" for algo in algos for lib in LIBS]
    results: list[Result] = []
    for name in names:
        t0 = time.perf_counter()
        r = run_child(name, args)
        took = time.perf_counter() - t0
        summary = f"{r.t_min:.3f} s/step" if r.status == "ok" else f"{r.status} ({r.reason})"
        print(f"[{name}] {summary} — {took:.0f}s", file=sys.stderr, flush=True)
        results.append(r)
    if not args.separate:
        for algo in algos:  # one interleaved group per algorithm: frozen + the three libraries
            group = ["frozen"] + [f"{lib}-{algo}" for lib in LIBS]
            ok = [n for n in group if next(r for r in results if r.name == n).status == "ok"]
            print(f"[interleaved] timing {', '.join(ok)} ...", file=sys.stderr, flush=True)
            times = interleaved_times(ok, args.steps, args.warmup, args.threads)
            for r in results:
                if r.name in times and (r.name != "frozen" or algo == algos[0]):
                    r.times = times[r.name]
                    r.t_min = min(r.times)
                    r.t_median = sorted(r.times)[len(r.times) // 2]
                if r.name in times and r.name != "frozen":
                    r.baseline_s = min(times["frozen"])
    print_table(results, args)
    if args.json:
        write_json(args.json, results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
