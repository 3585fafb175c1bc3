"""``lyco train``: dry run (config + data, no model), one-line errors naming the key, a real run, cancel/resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shapes_dataset import write_dataset
from test_tr_loop import tiny_pipeline

from lyco_core.cli.main import main
from lyco_core.formats.safetensors_io import read_header


@pytest.fixture
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline(tmp_path_factory, "sd1")


def write_config(tmp: Path, base: Path | str, extra: str = "") -> Path:
    write_dataset(tmp / "data")
    cfg = tmp / "train.toml"
    cfg.write_text(f"""
[model]
base = "{base}"

[network]
algo = "lokr"
preset = "attn-mlp"
dim = 4
alpha = 1.0
options = {{ factor = 4 }}

[data]
root = "data"          # relative to this file
resolution = 32
buckets = false

[train]
batch_size = 2
epochs = 2
unet_lr = 1e-3

[output]
dir = "out"
name = "cli"
tensorboard = false
{extra}
""")
    return cfg


def test_dry_run_prints_the_plan_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tmp_path / "no-such-model")  # a dry run must not even look at the base
    assert main(["train", str(cfg), "--dry-run", "--set", "train.epochs=5"]) == 0
    out = capsys.readouterr().out
    assert "6 image(s)" in out
    assert "shapes/circle" in out
    assert "shapes/square" in out
    assert "5 epoch(s) × 3 step(s) → 15 optimiser steps" in out
    assert "dry run: no model loaded" in out
    assert not (tmp_path / "out").exists()

    assert main(["train", str(cfg), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total_steps"] == 6
    assert plan["images"] == 6
    assert plan["batches_per_epoch"] == 3
    assert plan["concepts"]["shapes/circle"]["samples"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.epoch=3"], "unknown key 'train.epoch'"),
        (["--set", "network.algo=lorra"], "lorra"),
        (["--set", "train.batch_size=0"], "train.batch_size"),
        (["--set", "data.root=missing"], "missing"),
    ],
)
def test_bad_config_is_a_one_line_error(args: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tmp_path / "no-such-model")
    assert main(["train", str(cfg), "--dry-run", *args]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("lyco: error: ")
    assert message in err
    assert len(err.splitlines()) == 1


def test_missing_base_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tmp_path / "no-such-model")
    assert main(["train", str(cfg), "-q"]) != 0
    err = capsys.readouterr().err
    assert "no-such-model" in err
    assert "lyco: error:" in err


def test_train_then_resume_from_the_command_line(tmp_path: Path, sd1: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, sd1, extra="state_every_steps = 2\nkeep_states = 1\n")
    assert main(["train", str(cfg), "-q", "--json", "--set", "train.max_steps=4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"] == 4
    assert not doc["cancelled"]
    final = Path(doc["final_path"])
    assert final == tmp_path / "out" / "cli.safetensors"
    assert read_header(final).metadata["ss_network_module"] == "lycoris.kohya"
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("state-")] == ["state-00000004"]
    # the same command again is refused: it would overwrite the finished run
    assert main(["train", str(cfg), "-q", "--set", "train.max_steps=4"]) != 0
    assert "--force" in capsys.readouterr().err
    # --resume continues the run with more steps (the config now asks for 6)
    assert main(["train", str(cfg), "-q", "--json", "--resume"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"] == 6
    assert read_header(final).metadata["ss_steps"] == "6"
