"""Resumable states: an interrupted + resumed run ends with the same weights as an uninterrupted one; cancel leaves
a complete state; states are atomic, marked complete, pruned; resume errors name the folder."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tr_loop import make_config, tiny_pipeline

from lyco_core.errors import CorruptFileError, FileExistsLycoError, InvalidConfigError, NotFoundError
from lyco_core.formats.safetensors_io import load_tensors
from lyco_trainer import state as st
from lyco_trainer.callbacks import EventLog, StopAfter
from lyco_trainer.loop import Trainer, train


@pytest.fixture
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline(tmp_path_factory, "sd1")


def _resume_config(tmp: Path, base: Path, **extra: dict) -> object:
    # 6 images, batch 1, accumulation 2 → 3 steps per epoch, 2 epochs → 6 steps; caption shuffle + tag dropout,
    # rank dropout (global RNG) and noise offset: everything random must be restored for an exact resume
    return make_config(
        tmp, base,
        network={"algo": "lora", "options": {"rank_dropout": 0.2}},
        data={"shuffle_tags": True, "keep_tokens": 0, "tag_dropout": 0.2},
        train={"epochs": 2, "batch_size": 1, "gradient_accumulation": 2, "noise_offset": 0.1, "min_snr_gamma": 5.0},
        scheduler={"name": "cosine", "warmup_steps": 1},
        **extra,
    )


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path: Path, sd1: Path) -> None:
    base = sd1
    full = train(_resume_config(tmp_path / "a", base))
    assert full.steps == 6
    assert not full.cancelled

    cfg = _resume_config(tmp_path / "b", base)
    first = train(cfg, callback=StopAfter(4))  # stops mid-epoch 2 (epoch 1 has 3 steps)
    assert first.cancelled
    assert first.steps == 4
    assert first.final_path is None
    assert first.state_path == tmp_path / "b" / "out" / "state-00000004"
    log = EventLog()
    second = train(cfg, callback=log, resume=True)
    assert not second.cancelled
    assert second.steps == 6
    assert second.resumed_from == first.state_path
    assert [e.step for e in log.of("step")] == [5, 6]

    assert second.losses == full.losses  # the same micro-batches, noise, timesteps and dropout masks
    a = load_tensors(full.final_path)
    b = load_tensors(second.final_path)
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
        moved += int(not k.endswith("alpha") and a[k].abs().max() > 0)
    assert moved > 0
    # and the stop point itself is not a trivial one: the weights at step 4 differ from the final ones
    at4 = st.load_state(first.state_path).trainable
    final = {k: v for k, v in full.network.state_dict().items()}
    assert any(not torch.allclose(at4[k], final[k].cpu()) for k in at4)


def test_cancel_writes_a_complete_state(tmp_path: Path, sd1: Path) -> None:
    cfg = make_config(tmp_path, sd1, train={"epochs": 3}, output={"save_every_epochs": None})
    log = EventLog()

    class Stop(EventLog):
        def should_stop(self) -> bool:
            return len(self.of("step")) >= 2

    stop = Stop()
    res = train(cfg, callback=stop)
    assert res.cancelled
    assert res.steps == 2
    assert res.final_path is None
    p = res.state_path
    assert p is not None
    assert st.is_complete(p)
    assert sorted(x.name for x in p.iterdir()) == ["COMPLETE", "optimizer.pt", "rng.pt", "scheduler.pt",
                                                   "state.json", "trainable.safetensors"]
    loaded = st.load_state(p)
    assert loaded.info.step == 2
    assert loaded.info.epoch == 0
    assert loaded.info.batch == 2
    assert loaded.optimizer["state"], "the optimiser state (Adam moments) must be saved"
    assert len(loaded.info.losses) == 2
    assert stop.events[-1].kind == "end"
    assert stop.events[-1].message == "cancelled"
    assert not (tmp_path / "out" / "tiny.safetensors").exists()
    assert not [x for x in (tmp_path / "out").iterdir() if x.name.startswith(".")], "no temporary folder left"
    del log


def test_states_every_n_steps_are_pruned(tmp_path: Path, sd1: Path) -> None:
    cfg = make_config(tmp_path, sd1, train={"epochs": 2},
                      output={"state_every_steps": 1, "keep_states": 2, "save_every_epochs": None})
    res = train(cfg)
    assert res.steps == 6
    assert [s for s, _ in st.list_states(tmp_path / "out")] == [5, 6]
    # resuming a finished run does no more steps and writes the same final file again
    again = train(cfg, resume=True)
    assert again.steps == 6
    assert again.losses == res.losses


def test_fresh_run_refuses_an_earlier_runs_outputs(tmp_path: Path, sd1: Path) -> None:
    cfg = make_config(tmp_path, sd1, train={"max_steps": 1})
    train(cfg, callback=StopAfter(1))  # leaves state-00000001 (cancel after the last step)
    with pytest.raises(FileExistsLycoError, match="resumable states"):
        train(cfg)
    res = train(cfg, overwrite=True)  # --force: old states are removed
    assert res.final_path is not None
    assert res.final_path.is_file()
    assert st.list_states(tmp_path / "out") == []
    with pytest.raises(FileExistsLycoError, match=r"tiny\.safetensors exists"):
        train(cfg)


def test_resume_errors(tmp_path: Path, sd1: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(NotFoundError, match="no complete state"):
        st.resolve_resume(True, out)
    cfg = make_config(tmp_path, sd1, train={"epochs": 2})
    res = train(cfg, callback=StopAfter(1))
    assert res.state_path is not None
    (res.state_path / st.MARKER).unlink()  # as if the process died while writing it
    assert st.latest_state(out) is None
    with pytest.raises(CorruptFileError, match="incomplete state"):
        st.resolve_resume(res.state_path, out)
    (res.state_path / st.MARKER).write_text("step 1\n")
    changed = make_config(tmp_path, sd1, train={"epochs": 2, "batch_size": 3})
    with pytest.raises(InvalidConfigError, match="batch_size was 2"):
        Trainer(changed).run(resume=True)


def test_rng_capture_restore_roundtrip() -> None:
    rng = st.capture_rng()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    st.restore_rng(rng)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0]
    assert a[1] == b[1]
    assert torch.equal(a[2], b[2])
