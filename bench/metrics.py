#!/usr/bin/env python
"""Metrics benchmark: Lyco's Vendi score vs the `vendi-score` package, and encoder throughput on CPU.

Part 1 — Vendi score (q = 1, cosine kernel) of N random feature vectors of width D (default 2,000 and 10,000 ×
1024, float64), in one process, each contender timed ``--repeats`` times (minimum shown):

* ``lyco``: ``lyco_evaluator.metrics.vendi_score`` (the D×D matrix ŶᵀŶ/N when N > D, float64 ``eigvalsh``).
* ``score_dual``: ``vendi_score.vendi.score_dual(X)`` — the package's dual form (sklearn normalisation, XᵀX/N).
* ``score_X``: ``vendi_score.vendi.score_X(X)`` — the N×N kernel, which is what the official evaluation code
  (``metrics/vendi.py``, from dgm-eval) computes: ``eigvalsh(X̂X̂ᵀ/N)``.
* ``score``: ``vendi_score.vendi.score(X, k)`` with a Python cosine ``k`` — the package's generic entry point
  (N²/2 Python calls); only for N ≤ ``--kernel-loop-max`` (default 2,000).

Columns: time, ``x lyco`` (contender time / Lyco's), relative difference to Lyco's value.

Part 2 — features per second of ``lyco_evaluator.encoders.load_encoder`` encoders on CPU, preprocessing included
(PIL 512×512 RGB images, as generated images; CLIP text: prompts of ~12 words): the tiny test encoders
(``tiny=True``) and, unless ``--no-real``, real-size architectures with random weights written as transformers
folders (DINOv2-base: ``Dinov2Config()`` defaults = ViT-B/14, image_size 518 as the released checkpoint; CLIP
ViT-L/14: vision 24×1024, text 12×768, projection 768) and a VGG19 ``features`` state dict in torchvision's layout
(the encoder runs ``features[:29]``; Gram matrices included), at ``--batch`` 8.

Usage::

    .venv/bin/python bench/metrics.py                        # everything (a few minutes on 2 cores)
    .venv/bin/python bench/metrics.py --sizes 2000 --no-encoders
    .venv/bin/python bench/metrics.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lyco_evaluator import metrics


def _timed(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(value, minimum wall time in seconds) over ``repeats`` calls."""
    best, value = math.inf, math.nan
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return value, best


def _call_float(fn: Callable[..., Any], *args: Any) -> float:
    return float(fn(*args))


def make_features(n: int, d: int, seed: int) -> np.ndarray:
    """(n, d) float64 features like an encoder's: non-centred, correlated, with a decaying spectrum."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    scales = 1.0 / np.sqrt(1.0 + np.arange(d))
    return (rng.normal(size=(n, d)) * scales) @ basis.T + 0.05 * rng.normal(size=d)


def bench_vendi(sizes: list[int], dim: int, repeats: int, kernel_loop_max: int) -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vendi-score touches scipy.sparse.csr (deprecated namespace)
        from vendi_score import vendi

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / math.sqrt(float(a @ a) * float(b @ b)))

    rows: list[dict[str, Any]] = []
    for n in sizes:
        x = make_features(n, dim, seed=n)
        contenders: list[tuple[str, Callable[[], float], int]] = [
            ("lyco", partial(metrics.vendi_score, x), repeats),
            ("score_dual", partial(_call_float, vendi.score_dual, x), repeats),
            ("score_X", partial(_call_float, vendi.score_X, x), 1 if n > 4000 else repeats),
        ]
        if n <= kernel_loop_max:
            contenders.append(("score", partial(_call_float, vendi.score, list(x), cosine), 1))
        times: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
        values: dict[str, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics.vendi_score(x)  # warm-up (first LAPACK call, thread pool start)
            vendi.score_dual(x)
            # Round-robin: every contender runs once per round, so all see the same machine load.
            for _ in range(repeats):
                for name, fn, reps in contenders:
                    if len(times[name]) < reps:
                        t0 = time.perf_counter()
                        values[name] = fn()
                        times[name].append(time.perf_counter() - t0)
        lyco_t = min(times["lyco"])
        for name, _, _ in contenders:
            t = min(times[name])
            rel = abs(values[name] - values["lyco"]) / abs(values["lyco"])
            rows.append(
                {
                    "n": n,
                    "d": dim,
                    "contender": name,
                    "seconds": t,
                    "all_seconds": times[name],
                    "value": values[name],
                    "x_lyco": t / lyco_t,
                    "rel_diff": rel,
                }
            )
        print_vendi([r for r in rows if r["n"] == n], flush=True)
    return rows


def print_vendi(rows: list[dict[str, Any]], flush: bool = False) -> None:
    for r in rows:
        print(
            f"  N={r['n']:>6,} D={r['d']:<5} {r['contender']:<11} {r['seconds']:>9.3f} s  "
            f"x lyco {r['x_lyco']:>8.1f}  VS {r['value']:.9f}  rel diff {r['rel_diff']:.1e}",
            flush=flush,
        )


# ----------------------------------------------------------------------------------------------- encoders
def _images(n: int, size: int = 512, seed: int = 0) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = [
    "lun stuffed toy in grand canyon, wearing sunglasses, highly detailed photograph",
    "whoo anime girl, school uniform, standing in a classroom, soft lighting, smiling",
    "veli style of a city skyline during sunset with tall buildings and a river",
    "sohn man in a chef's outfit, cooking in a kitchen, realistic photo, warm colors",
]


def _write_real_dinov2(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=518)).save_pretrained(str(folder))
    return folder


def _write_real_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from lyco_trainer.models.tiny import write_tokenizer_files

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    text = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "image_size": 224,
        "patch_size": 14,
    }
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(str(folder))
    return folder


#: VGG19's ``features``: output widths of the 16 convs (3×3, padding 1, each followed by a ReLU); "M" = max-pool.
VGG19_WIDTHS: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M"]
VGG19_WIDTHS += [512, 512, 512, 512, "M"]


def _write_real_vgg19(path: Path) -> Path:
    """A random torchvision-layout ``vgg19`` ``features.N.weight/bias`` state dict (He init) at ``path``."""
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    idx, cin = 0, 3
    for item in VGG19_WIDTHS:
        if not isinstance(item, int):
            idx += 1
            continue
        cout = item
        sd[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2.0 / (9 * cin))
        sd[f"features.{idx}.bias"] = torch.zeros(cout)
        idx, cin = idx + 2, cout  # conv, ReLU
    torch.save(sd, path)
    return path


def _throughput(fn: Callable[[], Any], n: int, repeats: int) -> float:
    fn()  # warm-up
    _, t = _timed(lambda: (fn(), 0.0)[1], repeats)
    return n / t


def bench_encoders(batch: int, n_batches: int, real: bool, workdir: Path, repeats: int) -> list[dict[str, Any]]:
    try:
        from lyco_evaluator.encoders import load_encoder
    except ImportError as e:
        print(f"  encoders: skipped (lyco_evaluator.encoders.load_encoder not importable: {e})")
        return []
    n = batch * n_batches
    images = _images(n)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    rows: list[dict[str, Any]] = []

    def run(kind: str, label: str, enc: Any) -> None:
        if kind == "vgg19":
            fps = _throughput(lambda: metrics.gram_matrices(enc.feature_maps(images[:batch])), batch, repeats)
            rows.append({"encoder": label, "what": f"images/s (batch {batch}, +Gram)", "per_s": fps})
        else:
            fps = _throughput(lambda: enc.image_features(images, batch_size=batch), n, repeats)
            rows.append({"encoder": label, "what": f"images/s (batch {batch})", "per_s": fps})
            if kind == "clip":
                tps = _throughput(lambda: enc.text_features(texts, batch_size=batch), n, repeats)
                rows.append({"encoder": label, "what": f"texts/s (batch {batch})", "per_s": tps})
        for r in rows[-2:] if kind == "clip" else rows[-1:]:
            print(f"  {r['encoder']:<31} {r['what']:<26} {r['per_s']:>10.2f}", flush=True)

    for kind in ("dinov2", "clip", "vgg19"):
        try:
            enc = load_encoder(kind, None, tiny=True)
        except Exception as e:  # report and go on (e.g. an encoder kind not implemented yet)
            print(f"  tiny {kind}: skipped ({type(e).__name__}: {str(e)[:120]})")
            continue
        run(kind, f"tiny {kind} ({enc.image_size}px)", enc)
    if not real:
        return rows
    writers: dict[str, tuple[str, Callable[[Path], Path], str]] = {
        "dinov2": ("dinov2-base (ViT-B/14)", _write_real_dinov2, "dinov2-base"),
        "clip": ("CLIP ViT-L/14", _write_real_clip, "clip-vit-l-14"),
        "vgg19": ("VGG19 features[:29]", _write_real_vgg19, "vgg19-random.pth"),
    }
    for kind, (label, writer, name) in writers.items():
        path = workdir / name
        try:
            if not path.exists():
                writer(path)
            enc = load_encoder(kind, path)
        except Exception as e:
            print(f"  {label}: skipped ({type(e).__name__}: {str(e)[:160]})")
            continue
        run(kind, f"{label} ({enc.image_size}px)", enc)
        del enc
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,10000", help="comma-separated N for the Vendi comparison")
    ap.add_argument("--dim", type=int, default=1024, help="feature width D")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per contender (minimum shown)")
    ap.add_argument("--kernel-loop-max", type=int, default=2000, help="largest N for vendi.score with a Python k")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    ap.add_argument("--no-encoders", action="store_true", help="skip the encoder throughput part")
    ap.add_argument("--no-real", action="store_true", help="only the tiny encoders, not the real-size ones")
    ap.add_argument("--batch", type=int, default=8, help="encoder batch size")
    ap.add_argument("--batches", type=int, default=2, help="batches per encoder timing")
    ap.add_argument("--workdir", type=Path, help="where the random real-size encoders are written (reused)")
    ap.add_argument("--json", type=Path, help="write all results as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"VENDI (q=1, cosine kernel), D={args.dim}, float64, min of {args.repeats} runs")
    vendi_rows = bench_vendi(sizes, args.dim, args.repeats, args.kernel_loop_max)
    enc_rows: list[dict[str, Any]] = []
    if not args.no_encoders:
        print("ENCODERS on CPU (features per second, preprocessing of 512x512 PIL images included)")
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            enc_rows = bench_encoders(args.batch, args.batches, not args.no_real, args.workdir, args.repeats)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                enc_rows = bench_encoders(args.batch, args.batches, not args.no_real, Path(tmp), args.repeats)
    if args.json:
        args.json.write_text(json.dumps({"vendi": vendi_rows, "encoders": enc_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
