"""`lyco adapter check`: fit verdicts from keys and shapes alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_files import make_adapter, models
from checkpoints import ldm_state_dict, save_ldm, save_pipeline
from safetensors.torch import save_file
from tiny_sd import tiny_clip_text, tiny_sdxl_unet

from lyco_core.cli.main import main
from lyco_core.ops.check import check_adapter


def test_fits_every_layout(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "a.safetensors", "loha")
    m = models()
    folder = save_pipeline(tmp_path / "base", m["unet"], m["te"])
    ldm = save_ldm(tmp_path / "m.safetensors", ldm_state_dict(m["unet"], m["te"], te_layout="sd1"))
    for base in (folder, ldm):
        r = check_adapter(adapter, base)
        assert r.fits, r.reason
        assert len(r.loaded) == 291
        assert not r.unmatched
        assert r.base_family == "sd1"


def test_unet_only_base_lists_text_encoder_modules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = make_adapter(tmp_path / "a.safetensors", "lora")
    save_file(models()["unet"].state_dict(), str(tmp_path / "unet.safetensors"))
    r = check_adapter(adapter, tmp_path / "unet.safetensors")
    assert not r.fits
    assert len(r.unmatched) == 12
    assert all(k.startswith("lora_te_") for k in r.unmatched)
    assert main(["adapter", "check", str(adapter), "--base", str(tmp_path / "unet.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out
    assert "lora_te_text_model_encoder_layers_0" in out


def test_shape_mismatch_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = make_adapter(tmp_path / "a.safetensors", "lokr")
    m = models()
    sd = {**m["unet"].state_dict()}
    sd["conv_in.weight"] = torch.randn(16, 8, 3, 3)  # an inpainting-like conv_in with more input channels
    save_file(sd, str(tmp_path / "unet.safetensors"))
    assert main(["adapter", "check", str(adapter), "--base", str(tmp_path / "unet.safetensors"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["mismatched"]) == {"lora_unet_conv_in"}
    assert "[16, 4, 3, 3]" in doc["mismatched"]["lora_unet_conv_in"]
    assert doc["fits"] is False


def test_other_family_does_not_fit(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "a.safetensors", "lora")  # metadata says sd1
    xl = tiny_sdxl_unet()
    folder = save_pipeline(tmp_path / "xl", xl, tiny_clip_text(), tiny_clip_text())
    r = check_adapter(adapter, folder)
    assert r.base_family == "sdxl"
    assert not r.fits
    assert r.reason is not None
    assert "sd1" in r.reason
