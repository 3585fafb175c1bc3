"""`lyco_core` must import with torch, safetensors, numpy and pydantic only."""

from __future__ import annotations

import subprocess
import sys


def test_import_lyco_core_pulls_no_diffusers_or_transformers() -> None:
    code = (
        "import sys, lyco_core, lyco_core.cli.main\n"
        "bad = {'diffusers', 'transformers', 'peft', 'lycoris'}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in bad)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"lyco_core imported {out.stdout.strip()}"


def test_core_distribution_declares_only_the_four_dependencies() -> None:
    from importlib.metadata import requires

    deps = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requires("lyco-core") or []}
    assert deps == {"torch", "safetensors", "numpy", "pydantic"}
