"""The training loop on the tiny pipeline (32 px images, CPU): each algorithm learns, files reload in Lyco and
LyCORIS with the same UNet forward, metadata carries sd-scripts' ss_* keys, native writes a loadable pipeline,
progress events are complete, SDXL's added conditioning works."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from shapes_dataset import write_dataset

import lyco_core as lc
from lyco_core.formats.safetensors_io import read_header
from lyco_trainer.callbacks import EventLog
from lyco_trainer.config import TrainConfig, parse_config
from lyco_trainer.data import plan_epoch
from lyco_trainer.loop import Trainer, plan_run, train
from lyco_trainer.models import write_tiny_pipeline

# --------------------------------------------------------------------------------------------- helpers
_PIPES: dict[str, Path] = {}


def tiny_pipeline(factory: pytest.TempPathFactory, family: str = "sd1") -> Path:
    """A tiny diffusers pipeline folder, written once per test session and family (shared by the trainer tests)."""
    if family not in _PIPES:
        _PIPES[family] = write_tiny_pipeline(factory.mktemp("pipe") / family, family)  # type: ignore[arg-type]
    return _PIPES[family]


@pytest.fixture
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline(tmp_path_factory, "sd1")


@pytest.fixture
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline(tmp_path_factory, "sdxl")


def make_config(tmp: Path, base: Path, **sections: dict[str, Any]) -> TrainConfig:
    """A small config: 32 px, no buckets, batch 2, lr 1e-3, fp32 output, no TensorBoard; ``sections`` override
    table by table (``train={"epochs": 2}``)."""
    data_root = tmp / "data"
    if not data_root.exists():
        write_dataset(data_root)
    doc: dict[str, Any] = {
        "model": {"base": str(base)},
        "network": {"algo": "lora", "preset": "attn-mlp", "dim": 4, "alpha": 2.0},
        "data": {"root": str(data_root), "resolution": 32, "buckets": False},
        "train": {"batch_size": 2, "epochs": 1, "unet_lr": 1e-3, "text_encoder_lr": 1e-3, "seed": 3},
        "output": {"dir": str(tmp / "out"), "name": "tiny", "dtype": "fp32", "tensorboard": False},
        "sample": {"prompts": []},
    }
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return parse_config(doc, "test")


def unet_forward(unet: torch.nn.Module, cross_dim: int, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 4, generator=g)
    cond = torch.randn(2, 77, cross_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample


def fresh_unet(base: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(base / "unet")).eval()


# --------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize(
    ("algo", "options"),
    [("lora", {}), ("loha", {}), ("lokr", {"factor": 4}), ("native", {})],
)
def test_loss_goes_down_on_a_fixed_batch(algo: str, options: dict[str, Any], tmp_path: Path,
                                         sd1: Path) -> None:
    cfg = make_config(tmp_path, sd1, network={"algo": algo, "options": options},
                      train={"unet_lr": 1e-4 if algo == "native" else 1e-2, "max_grad_norm": None})
    tr = Trainer(cfg)
    tr.dataset, tr.plan = plan_run(cfg)
    tr.setup_models()
    tr.setup_optim(100)
    tr.setup_caches()
    batch = plan_epoch(tr.dataset, cfg.data, 2, 0, 0)[0]
    assert len(tr.text_cache) == 2, "the two distinct captions are encoded before the loop"
    assert tr.latent_cache.misses == 6, "every image is encoded once before the loop"
    # the same batch, captions, noise and timesteps every step: the loss must fall as the weights fit them
    losses = []
    for _ in range(15):
        losses.append(tr.micro_step(batch, 0, 0, 1.0))
        tr.optimizer_step()
    assert losses[-1] < 0.8 * losses[0], losses
    assert tr.latent_cache.misses == 6
    assert tr.text_cache.misses == 2
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # steadily, not by luck
    if algo != "native":
        base_params = [p for p in tr.models.unet.parameters()]
        assert not any(p.requires_grad for p in base_params), "the base must stay frozen"


@pytest.mark.parametrize(
    ("algo", "options", "lr"),
    [
        ("ia3", {}, 1e-2),
        ("glora", {}, 1e-2),
        ("full", {}, 1e-4),
        ("diag-oft", {}, 1e-2),
        ("boft", {}, 1e-2),
        ("dylora", {"block_size": 2}, 1e-2),
        ("lora", {"dora": True}, 1e-2),
    ],
)
def test_every_other_algorithm_trains(algo: str, options: dict[str, Any], lr: float, tmp_path: Path,
                                      sd1: Path) -> None:
    """The rest of the algorithms (and DoRA) through the same loop: the loss on a fixed batch falls."""
    cfg = make_config(tmp_path, sd1, network={"algo": algo, "options": options},
                      train={"unet_lr": lr, "max_grad_norm": None})
    tr = Trainer(cfg)
    tr.dataset, tr.plan = plan_run(cfg)
    tr.setup_models()
    tr.setup_optim(100)
    tr.setup_caches()
    batch = plan_epoch(tr.dataset, cfg.data, 2, 0, 0)[0]
    losses = []
    for _ in range(15):
        losses.append(tr.micro_step(batch, 0, 0, 1.0))
        tr.optimizer_step()
    assert losses[-1] < 0.95 * losses[0], losses
    assert not any(p.requires_grad for p in tr.models.unet.parameters()), "the base must stay frozen"


# --------------------------------------------------------------------------------------------- files
LYCORIS_PRESET = """
unet_target_module = ["Transformer2DModel"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
"""


@pytest.mark.parametrize(("algo", "options"), [("lora", {}), ("loha", {}), ("lokr", {"factor": 4})])
def test_saved_adapter_reloads_in_lyco_and_lycoris(algo: str, options: dict[str, Any], tmp_path: Path,
                                                    sd1: Path) -> None:
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
    from lycoris.utils.preset import read_preset
    from transformers import CLIPTextModel

    base = sd1
    cfg = make_config(tmp_path, base, network={"algo": algo, "options": options}, train={"max_steps": 3})
    tr = Trainer(cfg)
    res = tr.run()
    assert res.final_path == tmp_path / "out" / "tiny.safetensors"
    assert res.final_path.is_file()
    assert res.steps == 3
    assert not res.cancelled
    tr.network.eval()
    tr.models.unet.eval()
    expected = unet_forward(tr.models.unet, 32)  # the trained model in memory
    base_out = unet_forward(fresh_unet(base), 32)
    assert (expected - base_out).abs().max() > 1e-5, "training must change the UNet for this test to mean anything"

    unet2 = fresh_unet(base)
    loaded, report = lc.load_network(res.final_path, {"unet": unet2})
    assert report.complete
    assert len(loaded) == len(res.network)
    loaded.apply()
    torch.testing.assert_close(unet_forward(unet2, 32), expected, rtol=1e-5, atol=1e-6)

    unet3 = fresh_unet(base)
    te = CLIPTextModel.from_pretrained(str(base / "text_encoder"))
    preset = tmp_path / "lycoris_preset.toml"
    preset.write_text(LYCORIS_PRESET)
    LycorisNetworkKohya.apply_preset(read_preset(str(preset)))
    ref, _ = create_network_from_weights(1.0, str(res.final_path), None, te, unet3, for_inference=True)
    assert len(ref.unet_loras) == len(res.network)
    ref.apply_to(te, unet3, False, True)
    torch.testing.assert_close(unet_forward(unet3, 32), expected, rtol=1e-4, atol=1e-5)


def test_metadata_has_sd_scripts_keys(tmp_path: Path, sd1: Path) -> None:
    cfg = make_config(tmp_path, sd1, train={"epochs": 2, "batch_size": 3}, output={"save_every_epochs": 1})
    res = train(cfg)
    # 6 images, batch 3, no accumulation → 2 steps per epoch; an epoch file after epoch 1, the final file at the end
    assert res.steps == 4
    assert res.epochs == 2
    assert [p.name for p in res.saved] == ["tiny-000001.safetensors", "tiny.safetensors"]
    h = read_header(res.final_path).metadata
    assert h["ss_steps"] == "4"
    assert h["ss_epoch"] == "2"
    assert h["ss_num_epochs"] == "2"
    assert h["ss_max_train_steps"] == "4"
    assert h["ss_learning_rate"] == "0.001"
    assert h["ss_unet_lr"] == "0.001"
    assert h["ss_seed"] == "3"
    assert h["ss_batch_size_per_device"] == "3"
    assert h["ss_num_train_images"] == "6"
    assert h["ss_resolution"] == "(32, 32)"
    assert h["ss_base_model_version"] == "sd_v1"
    assert h["ss_v2"] == "False"
    assert h["ss_network_module"] == "networks.lora"
    assert h["ss_network_dim"] == "4"
    assert h["ss_network_alpha"] == "2.0"
    assert h["ss_optimizer"].startswith("torch.optim.adamw.AdamW") or "AdamW" in h["ss_optimizer"]
    assert h["ss_output_name"] == "tiny"
    assert h["ss_lr_scheduler"] == "constant"
    assert float(h["ss_training_finished_at"]) >= float(h["ss_training_started_at"])
    tags = json.loads(h["ss_tag_frequency"])
    assert tags == {"shapes/circle": {"circle": 3, "red": 3, "shape": 3},
                    "shapes/square": {"square": 3, "blue": 3, "shape": 3}}
    dirs = json.loads(h["ss_dataset_dirs"])
    assert dirs == {"shapes/circle": {"n_repeats": 1, "img_count": 3},
                    "shapes/square": {"n_repeats": 1, "img_count": 3}}
    assert len(h["sshs_model_hash"]) == 64
    assert h["modelspec.architecture"] == "stable-diffusion-v1/lora"
    meta = json.loads(h["lyco.metadata"])
    assert meta["base"]["family"] == "sd1"
    assert meta["base"]["prediction_type"] == "epsilon"
    assert meta["training"]["steps"] == 4
    epoch_file = read_header(res.saved[0]).metadata
    assert epoch_file["ss_steps"] == "2"
    assert epoch_file["ss_epoch"] == "1"
    assert "ss_training_finished_at" not in epoch_file


def test_native_writes_a_pipeline_with_the_trained_unet(tmp_path: Path, sd1: Path) -> None:
    from diffusers import StableDiffusionPipeline

    base = sd1
    cfg = make_config(tmp_path, base, network={"algo": "native"}, train={"max_steps": 2, "unet_lr": 1e-4})
    tr = Trainer(cfg)
    res = tr.run()
    assert res.final_path == tmp_path / "out" / "tiny"
    assert (res.final_path / "model_index.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(res.final_path))
    trained = tr.models.unet.state_dict()
    loaded = pipe.unet.state_dict()
    assert set(trained) == set(loaded)
    for k, v in trained.items():
        torch.testing.assert_close(loaded[k], v.cpu(), rtol=0, atol=0)
    original = fresh_unet(base).state_dict()
    assert any(not torch.equal(original[k], v) for k, v in trained.items()), "native training changed no weight"
    assert json.loads((res.final_path / "lyco_training.json").read_text())["training"]["steps"] == 2


def test_progress_events_and_sdxl(tmp_path: Path, sdxl: Path) -> None:
    """SDXL (two text encoders, pooled embeds and time ids), LoRA on the UNet and both text encoders,
    gradient accumulation 2, a warm-up schedule: every step reports its numbers."""
    cfg = make_config(
        tmp_path, sdxl,
        network={"train_text_encoder": True},
        train={"epochs": 2, "batch_size": 1, "gradient_accumulation": 2, "max_grad_norm": 1.0, "min_snr_gamma": 5.0,
               "noise_offset": 0.05},
        scheduler={"name": "cosine", "warmup_steps": 2},
        output={"save_every_epochs": None},
    )
    log = EventLog()
    res = train(cfg, callback=log)
    steps = log.of("step")
    assert res.total_steps == 6
    assert [e.step for e in steps] == list(range(1, 7))
    assert all(e.total_steps == 6 and e.loss is not None and e.loss > 0 for e in steps)
    assert all(e.it_per_s is not None and e.it_per_s > 0 and e.eta_s is not None for e in steps)
    assert all(e.peak_memory_mb is not None and e.peak_memory_mb > 10 for e in steps)
    assert steps[0].lr == pytest.approx(1e-3 / 2)
    assert steps[1].lr == pytest.approx(1e-3)
    assert [e.epoch for e in log.of("epoch")] == [1, 2]
    assert log.events[-1].kind == "end"
    assert log.events[-1].path == res.final_path
    keys = lc.read_adapter(res.final_path).modules
    assert any(k.startswith("lora_te1_") for k in keys)
    assert any(k.startswith("lora_te2_") for k in keys)
    assert read_header(res.final_path).metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_gradient_checkpointing_gives_the_same_training(tmp_path: Path, sd1: Path) -> None:
    """Checkpointing recomputes activations in backward; gradients (UNet adapters and text encoder adapters) must
    still reach every trained tensor, so the weights equal those of a run without it."""
    runs = {}
    for gc in (False, True):
        cfg = make_config(tmp_path / str(gc), sd1, network={"train_text_encoder": True},
                          train={"max_steps": 2, "gradient_checkpointing": gc})
        tr = Trainer(cfg)
        res = tr.run()
        assert tr.models.unet.is_gradient_checkpointing == gc
        runs[gc] = lc.read_adapter(res.final_path)
    assert any(k.startswith("lora_te_") for k in runs[True].modules)
    for key, m in runs[False].modules.items():
        for name, t in m.tensors.items():
            torch.testing.assert_close(runs[True].modules[key].tensors[name], t, rtol=1e-5, atol=1e-7)
        if "lora_up.weight" in m.tensors:
            assert m.tensors["lora_up.weight"].abs().max() > 0, f"{key} was not trained"


def test_samples_are_written_every_epoch(tmp_path: Path, sd1: Path) -> None:
    cfg = make_config(tmp_path, sd1, train={"epochs": 1}, sample={"prompts": ["circle, red"], "steps": 2})
    log = EventLog()
    res = train(cfg, callback=log)
    assert res.samples
    assert all(p.is_file() for p in res.samples)
    assert log.of("sample")


# --------------------------------------------------------------------------------------------- several processes
def _worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(cfg)


def test_two_processes_match_one_with_accumulation(tmp_path: Path, sd1: Path) -> None:
    """``accelerate launch``/``torchrun`` with 2 processes (gloo on CPU here): each takes every other micro-batch and
    gradients are summed, so batch 1 × 2 processes equals batch 1 × accumulation 2 in one process."""
    import socket

    import torch.multiprocessing as mp

    one = make_config(tmp_path / "one", sd1, train={"batch_size": 1, "gradient_accumulation": 2, "epochs": 2})
    ref = train(one)
    assert ref.steps == 6
    two = make_config(tmp_path / "two", sd1, train={"batch_size": 1, "gradient_accumulation": 1, "epochs": 2})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, two), nprocs=2, join=True, start_method="spawn")
    a = lc.read_adapter(ref.final_path)
    b_path = tmp_path / "two" / "out" / "tiny.safetensors"
    b = lc.read_adapter(b_path)
    assert read_header(b_path).metadata["ss_steps"] == "6"
    for key, m in a.modules.items():
        for name, t in m.tensors.items():
            torch.testing.assert_close(b.modules[key].tensors[name], t, rtol=1e-4, atol=1e-6)
