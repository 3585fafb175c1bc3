"""`lyco adapter bake`: every base layout, every algorithm, checked against the adapter merged on the live model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_files import make_adapter, models
from checkpoints import ldm_state_dict, save_ldm, save_pipeline
from checks import rel_err
from safetensors.torch import load_file, save_file

import lyco_core as lc
from lyco_core.checkpoint import open_base
from lyco_core.cli.main import main
from lyco_core.errors import FileExistsLycoError, IncompatibleBaseError
from lyco_core.ops.bake import BAKED_KEY, bake


def _reference(adapters: list[tuple[Path, float]]) -> dict[str, torch.nn.Module]:
    """The tiny models with the adapters merged in by the network code (the independent path)."""
    m = models()
    for path, mult in adapters:
        net, report = lc.load_network(path, m, multiplier=mult)
        assert report.complete
        net.merge()
    return m


def _assert_same(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    changed_at_least: int = 1,
    original: dict[str, torch.Tensor] | None = None,
) -> None:
    """``got`` equals ``want`` tensor by tensor (names, dtypes, values), and differs from the original weights."""
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype, k
        assert rel_err(got[k].float(), w.float()) < 1e-5, k
    if original is None:
        before = models()
        original = {**before["unet"].state_dict(), **before["te"].state_dict()}
    changed = sum(1 for k in got if k in original and not torch.equal(got[k], original[k]))
    assert changed >= changed_at_least


@pytest.mark.parametrize("variant", ["lora", "loha", "lokr", "lora-dora", "diag-oft", "ia3", "glora", "full"])
def test_bake_pipeline_folder_equals_live_merge(variant: str, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "a.safetensors", variant)
    m = models()
    base = save_pipeline(tmp_path / "base", m["unet"], m["te"])
    report = bake(base, [adapter], tmp_path / "out", multipliers=[0.7])
    assert len(report.modules) == 291
    ref = _reference([(adapter, 0.7)])
    got_unet = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    got_te = load_file(tmp_path / "out" / "text_encoder" / "model.safetensors")
    _assert_same(got_unet, ref["unet"].state_dict(), 100)
    _assert_same(got_te, ref["te"].state_dict(), 10)
    # everything else is copied, and the folder still loads in diffusers
    assert (tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text() == (
        base / "scheduler" / "scheduler_config.json"
    ).read_text()
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    assert rel_err(loaded.conv_in.weight, ref["unet"].conv_in.weight) < 1e-6


@pytest.mark.parametrize("second", ["diag-oft", "lora-tucker"])  # the exact rule, and the row-block LoRA path
def test_bake_two_adapters_in_order_with_multipliers(second: str, tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a.safetensors", "lora", seed=1)
    b = make_adapter(tmp_path / "b.safetensors", second, seed=2)
    m = models()
    save_file(m["unet"].state_dict(), str(tmp_path / "unet.safetensors"))
    unet_only = tmp_path / "unet.safetensors"
    report = bake(unet_only, [a, b], tmp_path / "out.safetensors", multipliers=[0.5, -1.0], skip_unmatched=True)
    te_modules = [k for k in lc.read_adapter(a).modules if k.startswith("lora_te_")]
    assert len(te_modules) == 12
    assert len(report.dropped) == 2 * 12  # the text-encoder modules have no layer in a UNet state dict
    ref = _reference([(a, 0.5), (b, -1.0)])
    _assert_same(load_file(tmp_path / "out.safetensors"), ref["unet"].state_dict(), 100)


@pytest.mark.parametrize("te_layout", ["sd1", "sd2"])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_bake_ldm_single_file(te_layout: str, suffix: str, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "a.safetensors", "lokr")
    m = models()
    base = save_ldm(tmp_path / f"model{suffix}", ldm_state_dict(m["unet"], m["te"], te_layout=te_layout))
    with open_base(base) as b:
        assert b.kind == "ldm"
        assert b.family == te_layout  # tiny widths: decided by structure (OpenCLIP TE → sd2, conv proj_in → sd1)
    out = tmp_path / "baked.safetensors"
    report = bake(base, [adapter], out)
    assert not report.dropped
    assert len(report.modules) == 291
    ref = _reference([(adapter, 1.0)])
    want = ldm_state_dict(ref["unet"], ref["te"], te_layout=te_layout)
    got = load_file(out)
    want["first_stage_model.decoder.conv_in.weight"] = got["first_stage_model.decoder.conv_in.weight"]
    original = ldm_state_dict(m["unet"], m["te"], te_layout=te_layout)
    _assert_same(got, want, 100, original)
    if suffix == ".safetensors":
        from lyco_core.formats.safetensors_io import read_header

        meta = read_header(out).metadata
        assert meta["format"] == "pt"
        assert BAKED_KEY in meta


def test_bake_keeps_dtype(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "a.safetensors", "lora")
    m = models()
    sd = {k: v.half() for k, v in m["unet"].state_dict().items()}
    save_file(sd, str(tmp_path / "unet16.safetensors"))
    bake(tmp_path / "unet16.safetensors", [adapter], tmp_path / "out.safetensors", skip_unmatched=True)
    got = load_file(tmp_path / "out.safetensors")
    ref = _reference([(adapter, 1.0)])["unet"].state_dict()
    for k, v in got.items():
        assert v.dtype == torch.float16
        assert rel_err(v.float(), ref[k].half().float()) < 2e-3


def test_bake_refuses_mismatch_and_existing_output(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "a.safetensors", "lora")
    m = models()
    save_file(m["unet"].state_dict(), str(tmp_path / "unet.safetensors"))
    with pytest.raises(IncompatibleBaseError, match="lora_te_text_model"):
        bake(tmp_path / "unet.safetensors", [adapter], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    with pytest.raises(FileExistsLycoError):
        bake(tmp_path / "unet.safetensors", [adapter], tmp_path / "out.safetensors", skip_unmatched=True)
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"
    # a base whose layer has another shape: refused before writing, naming the module
    other = models()["unet"].state_dict()
    other["conv_in.weight"] = torch.randn(16, 4, 5, 5)
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(IncompatibleBaseError, match="lora_unet_conv_in"):
        bake(tmp_path / "other.safetensors", [adapter], tmp_path / "o2.safetensors", skip_unmatched=True)
    assert not (tmp_path / "o2.safetensors").exists()


def test_bake_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = make_adapter(tmp_path / "a.safetensors", "lora")
    m = models()
    base = save_pipeline(tmp_path / "base", m["unet"], m["te"])
    assert main(["adapter", "bake", str(base), str(adapter), "-o", str(tmp_path / "out"), "--multiplier", "0.5"]) == 0
    assert "291 module(s)" in capsys.readouterr().out
    assert main(["adapter", "bake", str(base), str(adapter), "-o", str(tmp_path / "out")]) != 0
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float16])
def test_bake_through_recycled_buffers_and_chunked_direct_writes(
    base_dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every tensor taken from the buffer pool and the output written in many small direct chunks (the paths a
    full-size model takes), the bake is byte for byte the same file, and buffers were really reused."""
    from lyco_core.buffers import BufferPool
    from lyco_core.formats import direct_io
    from lyco_core.ops import bake as bake_module

    lora = make_adapter(tmp_path / "lora.safetensors", "lora", seed=1)
    loha = make_adapter(tmp_path / "loha.safetensors", "loha", seed=2)
    base = tmp_path / "unet.safetensors"
    save_file({k: v.to(base_dtype) for k, v in models()["unet"].state_dict().items()}, str(base))
    runs = {"lora": [lora], "loha": [loha], "both": [lora, loha]}  # row-block path, exact rule, and the two stacked
    for name, adapters in runs.items():
        bake(base, adapters, tmp_path / f"{name}-plain.safetensors", multipliers=[0.7], skip_unmatched=True)

    pools: list[BufferPool] = []

    def small_pool() -> BufferPool:
        pools.append(BufferPool(min_bytes=0))
        return pools[-1]

    monkeypatch.setattr(bake_module, "BufferPool", small_pool)
    monkeypatch.setattr(direct_io, "CHUNK_BYTES", 3 * 4096)
    for name, adapters in runs.items():
        out = tmp_path / f"{name}-small.safetensors"
        bake(base, adapters, out, multipliers=[0.7], skip_unmatched=True)
        assert out.read_bytes() == (tmp_path / f"{name}-plain.safetensors").read_bytes(), name
        assert pools[-1].reused > 10, name
        assert pools[-1].lent == 0, name  # every buffer went back: written, or replaced by an exact rule's result
    ref = _reference([(lora, 0.7), (loha, 0.7)])["unet"].state_dict()
    got = load_file(tmp_path / "both-small.safetensors")
    for k, v in got.items():
        assert v.dtype == base_dtype
        assert rel_err(v.float(), ref[k].to(base_dtype).float()) < (1e-5 if base_dtype == torch.float32 else 2e-3), k
