"""lyco_core.ops.resize / `lyco adapter resize`: SVD re-rank to LoRA, checked against independent SVDs and bakes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from adapter_files import base_weights, make_adapter, models
from checks import rel_err

from lyco_core.algorithms import get
from lyco_core.cli.adapter import resize as resize_cli
from lyco_core.errors import FileExistsLycoError, InvalidConfigError
from lyco_core.files import ModuleTensors, read_adapter, write_adapter
from lyco_core.formats.safetensors_io import read_header
from lyco_core.ops.resize import resize_adapter

Base = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


@pytest.fixture(scope="module")
def base() -> Base:
    return base_weights()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("resize_inputs")
    model = models()
    variants = ("lora", "lora-tucker", "loha", "lokr", "full", "dylora", "lora-dora", "ia3")
    return {v: make_adapter(d / f"{v}.safetensors", v, model=model) for v in variants}


def exact_deltas(path: Path, base: Base) -> dict[str, torch.Tensor]:
    """Module key → ΔW computed by lyco_core's exact merge rule (float64 for the reference SVDs)."""
    return {k: m.delta_weight(base[k][0]).double() for k, m in read_adapter(path).modules.items()}


def best_rank(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    """Eckart–Young: the best rank-r approximation of ΔW (flattened for convs) and its relative error."""
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    return approx.reshape(delta.shape), float(s[r:].norm() / s.norm())


def test_same_rank_is_exact(files: dict[str, Path], base: Base, tmp_path: Path) -> None:
    out = tmp_path / "r4.safetensors"
    report = resize_adapter(files["lora"], out, rank=4)
    src, new = read_adapter(files["lora"]), read_adapter(out)
    assert set(new.modules) == set(src.modules)
    assert len(report.modules) == 291
    for key, m in new.modules.items():
        w, b = base[key]
        assert m.algorithm.name == "lora"
        assert report.modules[key].rank == 4
        assert report.modules[key].rel_error < 1e-5
        # baking: the resized module merges to the same weights as the original
        assert rel_err(m.merge(w, b)[0] - w, src.modules[key].merge(w, b)[0] - w) < 1e-5


def test_rank2_is_best_approximation(files: dict[str, Path], base: Base, tmp_path: Path) -> None:
    out = tmp_path / "r2.safetensors"
    report = resize_adapter(files["lora"], out, rank=2)
    exact = exact_deltas(files["lora"], base)
    new = read_adapter(out)
    for key, m in new.modules.items():
        got = m.delta_weight(base[key][0]).double()
        best, optimum = best_rank(exact[key], 2)
        assert m.tensors["lora_down.weight"].shape[0] == 2
        assert float(m.tensors["alpha"]) == 2.0
        assert rel_err(got, best) < 1e-4, key
        measured = rel_err(got, exact[key])
        assert report.modules[key].rel_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
        assert report.modules[key].rel_error == pytest.approx(optimum, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("variant", ["loha", "lokr", "full", "lora-tucker", "dylora"])
def test_other_algorithms_become_lora(variant: str, files: dict[str, Path], base: Base, tmp_path: Path) -> None:
    out = tmp_path / f"{variant}.safetensors"
    report = resize_adapter(files[variant], out, rank=3, allow_drop=(variant == "full"))
    exact = exact_deltas(files[variant], base)
    new = read_adapter(out)
    assert set(new.modules) == set(exact)
    errs = []
    for key, m in new.modules.items():
        assert m.algorithm.name == "lora"
        assert set(m.tensors) == {"lora_up.weight", "lora_down.weight", "alpha"}
        got = m.delta_weight(base[key][0]).double()
        measured = rel_err(got, exact[key])
        _, optimum = best_rank(exact[key], 3)
        assert report.modules[key].rel_error == pytest.approx(measured, rel=1e-3, abs=1e-6), key
        assert measured == pytest.approx(optimum, rel=1e-3, abs=1e-6), key
        errs.append(measured)
    assert max(errs) > 0.01  # rank 3 < the inputs' ranks: a real truncation happened
    if variant == "full":  # the Full file changes biases, which a LoRA cannot hold
        biased = [k for k, (_, b) in base.items() if b is not None and k in exact]
        assert sorted(report.dropped) == sorted(f"{k}.diff_b" for k in biased)


def test_full_with_bias_refused_without_flag(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match=r"changes the bias.*--drop-unsupported"):
        resize_adapter(files["full"], tmp_path / "x.safetensors", rank=2)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("variant", ["lora-dora", "ia3"])
def test_base_dependent_modules(variant: str, files: dict[str, Path], base: Base, tmp_path: Path) -> None:
    src = read_adapter(files[variant])
    first = sorted(src.modules)[0]
    with pytest.raises(InvalidConfigError, match=f"{first}.*depends on the base"):
        resize_adapter(files[variant], tmp_path / "a.safetensors", rank=2)
    with pytest.raises(InvalidConfigError, match="no module left"):
        resize_adapter(files[variant], tmp_path / "b.safetensors", rank=2, allow_drop=True)
    # a file mixing plain LoRA modules with these: the others are dropped and listed
    plain = read_adapter(files["lora"]).modules
    keys = sorted(src.modules)
    mixed = {k: (src.modules[k] if i % 2 else plain[k]) for i, k in enumerate(keys)}
    write_adapter(tmp_path / "mixed.safetensors", mixed)
    report = resize_adapter(tmp_path / "mixed.safetensors", tmp_path / "b.safetensors", rank=2, allow_drop=True)
    assert set(report.dropped) == set(keys[1::2])
    assert set(read_adapter(tmp_path / "b.safetensors").modules) == set(keys[::2])

    report = resize_adapter(files[variant], tmp_path / "c.safetensors", rank=6, base=base.__getitem__)
    new = read_adapter(tmp_path / "c.safetensors")
    for key, m in new.modules.items():
        w, b = base[key]
        exact = src.modules[key].merge(w, b)[0].double() - w.double()
        got = m.merge(w, b)[0].double() - w.double()
        assert report.modules[key].rel_error == pytest.approx(rel_err(got, exact), rel=1e-3, abs=1e-6)
        assert report.modules[key].rel_error == pytest.approx(best_rank(exact, report.modules[key].rank)[1],
                                                              rel=1e-3, abs=1e-6)


def crafted_file(path: Path) -> dict[str, torch.Tensor]:
    """Three LoRA modules whose ΔW has known singular values (orthonormal factors)."""
    spectra = {
        "lora_unet_a": torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25]),
        "lora_unet_b": torch.tensor([5.0, 4.5, 4.0, 0.1, 0.05, 0.01]),
        "lora_unet_c": torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5]),
    }
    g = torch.Generator().manual_seed(0)
    mods = {}
    for i, (key, s) in enumerate(spectra.items()):
        o, n = 20 + i, 30
        u = torch.linalg.qr(torch.randn(o, 6, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, 6, generator=g)).Q
        t = {"lora_up.weight": u * s * 3.0, "lora_down.weight": v.T.contiguous(), "alpha": torch.tensor(2.0)}
        mods[key] = ModuleTensors(key, get("lora"), t)  # scale α/r = 1/3 undoes the ×3
    write_adapter(path, mods)
    return spectra


@pytest.mark.parametrize(
    ("mode", "param", "cap", "expected"),
    [
        ("sv_ratio", 3.5, None, {"a": 2, "b": 3, "c": 6}),  # σ ≥ σ_max/3.5
        ("sv_fro", 0.95, None, {"a": 2, "b": 3, "c": 5}),  # √(cumsum σ²/Σσ²): a .87 .97; b .64 .86 .9999; c … .91 .96
        ("sv_cumulative", 0.9, None, {"a": 4, "b": 3, "c": 6}),  # cumsum σ/Σσ: a .51 .76 .89 .95; b .37 .70 .99
        ("sv_fro", 0.95, 1, {"a": 1, "b": 1, "c": 1}),
    ],
)
def test_dynamic_ranks(mode: str, param: float, cap: int | None, expected: dict[str, int], tmp_path: Path) -> None:
    spectra = crafted_file(tmp_path / "in.safetensors")
    report = resize_adapter(tmp_path / "in.safetensors", tmp_path / "out.safetensors", dynamic=mode, param=param,
                            rank=cap)
    new = read_adapter(tmp_path / "out.safetensors")
    for short, r in expected.items():
        key = f"lora_unet_{short}"
        assert report.modules[key].rank == r, key
        assert new.modules[key].tensors["lora_down.weight"].shape[0] == r
        s = spectra[key]
        assert report.modules[key].rel_error == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-4, abs=1e-7)
        got = torch.linalg.svdvals(new.modules[key].delta_weight(torch.zeros(20 + "abc".index(short), 30)))
        assert torch.allclose(got[:r], s[:r], rtol=1e-4)
        assert float(got[r:].abs().max()) < 1e-5


def test_conv_rank_and_dtype(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "conv.safetensors"
    report = resize_adapter(files["lora"], out, rank=2, conv_rank=3, dtype=torch.float16)
    new = read_adapter(out)
    for key, m in new.modules.items():
        down = m.tensors["lora_down.weight"]
        kxk = down.ndim == 4 and down.shape[2] > 1
        assert down.shape[0] == (3 if kxk else 2)
        assert report.modules[key].rank == down.shape[0]
        assert all(t.dtype == torch.float16 for t in m.tensors.values())
    assert any(m.tensors["lora_down.weight"].shape[0] == 3 for m in new.modules.values())
    assert "resized by lyco: rank 2, conv rank 3" in read_header(out).metadata["ss_training_comment"]


def test_refuses_overwrite_and_bad_options(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsLycoError):
        resize_adapter(files["lora"], out, rank=2)
    assert out.read_bytes() == b"keep"
    with pytest.raises(InvalidConfigError, match="--rank"):
        resize_adapter(files["lora"], tmp_path / "p.safetensors")
    with pytest.raises(InvalidConfigError, match="--param"):
        resize_adapter(files["lora"], tmp_path / "p.safetensors", dynamic="sv_fro")
    with pytest.raises(InvalidConfigError, match="--dynamic"):
        resize_adapter(files["lora"], tmp_path / "p.safetensors", dynamic="fixed", param=2)
    with pytest.raises(InvalidConfigError, match="--rank"):
        resize_adapter(files["lora"], tmp_path / "p.safetensors", rank=0)
    with pytest.raises(InvalidConfigError, match="sv_fro"):
        resize_adapter(files["lora"], tmp_path / "p.safetensors", dynamic="sv_fro", param=1.5)


def test_cli(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    resize_cli.register(parser.add_subparsers())
    run = ["resize"]
    out = tmp_path / "cli.safetensors"
    args = parser.parse_args([*run, str(files["loha"]), "-o", str(out), "--dynamic", "sv_fro", "--param", "0.9",
                              "--rank", "3", "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["operation"] == "resize"
    ranks = {m["rank"] for m in report["modules"].values()}
    assert ranks <= {1, 2, 3}
    assert len(ranks) > 1
    assert read_adapter(out).algorithms() == {"lora": 291}
    args = parser.parse_args([*run, str(files["loha"]), "-o", str(out), "--rank", "2"])
    with pytest.raises(FileExistsLycoError):
        args.func(args)
    args = parser.parse_args([*run, str(files["loha"]), "-o", str(out), "--rank", "2", "--force"])
    assert args.func(args) == 0
    assert "resize: 291 module(s)" in capsys.readouterr().out


def test_loha_without_metadata_needs_base(files: dict[str, Path], base: Base, tmp_path: Path) -> None:
    """LoHa factors of a conv are flattened: without Lyco metadata only the base tells the layer shape."""
    from safetensors.torch import save_file

    src = read_adapter(files["loha"])
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in src.tensors().items()}, str(bare))
    with pytest.raises(InvalidConfigError, match="layer shape is unknown"):
        resize_adapter(bare, tmp_path / "x.safetensors", rank=2)
    report = resize_adapter(bare, tmp_path / "y.safetensors", rank=2, base=base)
    new = read_adapter(tmp_path / "y.safetensors")
    for key, m in new.modules.items():
        w = base[key][0]
        assert m.tensors["lora_down.weight"].ndim == w.ndim
        exact = src.modules[key].delta_weight(w).double()
        assert report.modules[key].rel_error == pytest.approx(rel_err(m.delta_weight(w).double(), exact), rel=1e-3)
