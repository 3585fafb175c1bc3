"""`lyco adapter inspect`: output, --json, and one-line errors with non-zero exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import lyco_core as lc

LYCO = [sys.executable, "-m", "lyco_core.cli.main"]


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    net = lc.create_network(nn.Sequential(nn.Linear(8, 8), nn.Conv2d(8, 8, 3)), algo="loha", dim=2)
    path = tmp_path / "x.safetensors"
    net.save(path, base_family="sdxl")
    return path


def test_inspect_json(adapter: Path) -> None:
    out = subprocess.run([*LYCO, "adapter", "inspect", str(adapter), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["schema_version"] == "1.0"
    assert info["algorithms"] == {"loha": 2}
    assert set(info["modules"]) == {"lycoris_0", "lycoris_1"}
    assert info["metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"
    assert len(info["payload_sha256"]) == 64
    assert info["metadata"]["sshs_model_hash"] == info["payload_sha256"]


def test_inspect_text(adapter: Path) -> None:
    out = subprocess.run([*LYCO, "adapter", "inspect", str(adapter)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "loha: 2" in out.stdout
    assert "ss_network_module = lycoris.kohya" in out.stdout


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "x.safetensors"),
        (lambda b: (2**40).to_bytes(8, "little") + b[8:], "header too large"),
        (lambda b: b[:8] + b"\xff" * (len(b) - 8), "x.safetensors"),
    ],
)
def test_bad_files_give_one_line_errors(adapter: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    adapter.write_bytes(damage(adapter.read_bytes()))
    out = subprocess.run([*LYCO, "adapter", "inspect", str(adapter)], capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("lyco: error:")
    assert message in lines[0]


def test_missing_file(tmp_path: Path) -> None:
    out = subprocess.run([*LYCO, "adapter", "inspect", str(tmp_path / "nope.safetensors")], capture_output=True,
                         text=True)
    assert out.returncode != 0
    assert "nope.safetensors" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_lists_operations() -> None:
    out = subprocess.run([*LYCO, "adapter", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "inspect" in out.stdout


def test_console_script_is_installed() -> None:
    lyco = Path(sys.executable).with_name("lyco")
    out = subprocess.run([str(lyco), "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.startswith("lyco-core ")
