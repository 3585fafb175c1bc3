"""`lyco adapter inspect`: the library dict (checked against the raw file), text and JSON output."""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from adapter_files import make_adapter
from safetensors import safe_open

from lyco_core.cli.adapter.inspect import cmd_inspect
from lyco_core.cli.main import main
from lyco_core.formats.safetensors_io import save_tensors
from lyco_core.ops.inspect import inspect_adapter, summary_lines


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("inspect") / "a.safetensors", "lora")


def _raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Tensors, metadata and the sha256 of the data section, read without lyco_core."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = f.metadata() or {}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return tensors, meta, hashlib.sha256(data[8 + n :]).hexdigest()


def test_facts_match_the_raw_file(lora_file: Path) -> None:
    info = inspect_adapter(lora_file)
    tensors, meta, digest = _raw(lora_file)
    keys = {name.split(".", 1)[0] for name in tensors}
    assert info["module_count"] == len(keys) == 291
    assert set(info["modules"]) == keys
    assert info["algorithms"] == {"lora": 291}
    assert info["roles"] == {"te": sum(k.startswith("lora_te_") for k in keys),
                             "unet": sum(k.startswith("lora_unet_") for k in keys)}
    assert info["rank_histogram"] == {"4": 291}
    assert info["alpha_histogram"] == {"2.0": 291}
    assert info["parameters"] == sum(t.numel() for n, t in tensors.items() if not n.endswith(".alpha"))
    assert info["tensor_count"] == len(tensors)
    assert info["dtype_counts"] == {"float32": len(tensors)}
    assert info["size_bytes"] == lora_file.stat().st_size
    assert info["payload_sha256"] == digest
    assert info["hash_matches"] == {"sshs_model_hash": True, "modelspec.hash_sha256": True}
    assert info["schema_version"] == "1.0"
    assert info["base_family"]["family"] == "sd1"
    assert info["base_family"]["evidence"]
    assert info["metadata"] == meta
    split = info["metadata_split"]
    assert split["ss"]["ss_network_module"] == "networks.lora"
    assert split["modelspec"]["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert split["lyco"]["base"]["family"] == "sd1"
    assert set(split["ss"]) | set(split["modelspec"]) | set(split["other"]) | {"lyco.metadata", "lyco.schema_version"} \
        == set(meta)


def test_foreign_file_with_stale_hash_and_mixed_dtypes(tmp_path: Path) -> None:
    tensors = {
        "lora_te1_x.lora_down.weight": torch.randn(2, 8).half(),
        "lora_te1_x.lora_up.weight": torch.randn(8, 2).half(),
        "lora_te2_y.hada_w1_a": torch.randn(8, 3), "lora_te2_y.hada_w1_b": torch.randn(3, 8),
        "lora_te2_y.hada_w2_a": torch.randn(8, 3), "lora_te2_y.hada_w2_b": torch.randn(3, 8),
        "lora_te2_y.alpha": torch.tensor(3.0),
        "lora_unet_z.weird": torch.zeros(2),
    }
    path = tmp_path / "f.safetensors"
    save_tensors(path, tensors, {"sshs_model_hash": "0x" + "0" * 64, "ss_output_name": "mine", "software": "x"})
    info = inspect_adapter(path)
    assert info["schema_version"] is None
    assert info["algorithms"] == {"lora": 1, "loha": 1}
    assert info["roles"] == {"te1": 1, "te2": 1}
    assert info["rank_histogram"] == {"2": 1, "3": 1}
    assert info["dtypes"] == ["float16", "float32"]
    assert info["unknown_tensors"] == ["lora_unet_z.weird"]
    assert info["hash_matches"] == {"sshs_model_hash": False}
    assert info["metadata_split"]["other"] == {"software": "x"}
    assert info["metadata_split"]["lyco"] is None
    assert info["base_family"]["family"] == "sdxl"  # lora_te2_
    text = "\n".join(summary_lines(info))
    assert "(no Lyco metadata)" in text
    assert "DIFFERS from stored sshs_model_hash" in text
    assert "ss_output_name = mine" in text
    assert "unknown     1 tensor(s)" in text


def test_text_output(lora_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapter", "inspect", str(lora_file)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "family      sd1" in lines
    assert any(ln.startswith("  evidence  proj_in is a 1×1 conv") for ln in lines)
    assert "algorithms  lora: 291" in lines
    assert "ranks       4 ×291" in lines
    assert "(matches sshs_model_hash, modelspec.hash_sha256)" in text
    assert "  ss_network_module = networks.lora" in lines
    assert "lora_unet_conv_in" not in text  # modules only with --modules
    assert len(lines) < 60
    assert main(["adapter", "inspect", str(lora_file), "--modules"]) == 0
    listed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  lora_")]
    assert len(listed) == 291
    assert "  lora_unet_conv_in  lora  rank=4 alpha=2.0" in listed


def test_json_output(lora_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_inspect(argparse.Namespace(file=str(lora_file), json=True, modules=False)) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("schema_version", "algorithms", "modules", "base_family", "payload_sha256", "metadata"):
        assert key in info
    assert info["base_family"]["family"] == "sd1"
    assert info["modules"]["lora_unet_conv_in"] == {"algo": "lora", "rank": 4, "alpha": 2.0}
