"""Adapter files written and read through the network API: metadata, hashes, unknown keys, bad input."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lyco_core as lc
from lyco_core.errors import CorruptFileError, FileExistsLycoError, IncompatibleBaseError
from lyco_core.formats.metadata import read_metadata


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Unflatten(1, (16, 1)), nn.Conv1d(16, 16, 3, padding=1))


def _saved(tmp_path: Path, family: str | None = None, **opts: object) -> tuple[nn.Module, lc.AdapterNetwork, Path]:
    model = _model()
    net = lc.create_network(model, dim=2, **opts)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    path = tmp_path / "a.safetensors"
    net.save(path, base_family=family)
    return model, net, path


def test_metadata_and_payload_hash(tmp_path: Path) -> None:
    _, net, path = _saved(tmp_path, family="sd1", algo="loha", alpha=1.0)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])["__metadata__"]
    assert header["sshs_model_hash"] == hashlib.sha256(raw[8 + n :]).hexdigest()
    assert header["modelspec.hash_sha256"] == "0x" + header["sshs_model_hash"]
    assert header["ss_network_module"] == "lycoris.kohya"
    assert json.loads(header["ss_network_args"])["algo"] == "loha"
    meta = read_metadata(header).lyco
    assert meta is not None
    assert meta.algorithms == {"loha": 2}
    assert set(meta.modules) == {m.key for m in net}
    assert all(s.rank == 2 for s in meta.modules.values())


def test_plain_lora_file_says_networks_lora(tmp_path: Path) -> None:
    _, _, path = _saved(tmp_path, algo="lora")
    assert lc.read_adapter(path).header["ss_network_module"] == "networks.lora"


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    _, net, path = _saved(tmp_path)
    before = path.read_bytes()
    with pytest.raises(FileExistsLycoError, match=r"a\.safetensors"):
        net.save(path)
    assert path.read_bytes() == before
    net.save(path, overwrite=True)


def test_round_trip_gives_the_same_forward(tmp_path: Path) -> None:
    model, net, path = _saved(tmp_path, algo="lokr", factor=2, dora=True)
    x = torch.randn(3, 8)
    base = model(x)
    net.apply()
    expected = model(x)
    model2 = _model()
    net2, report = lc.load_network(path, model2)
    assert report.complete
    assert {m.algorithm.name for m in net2} == {"lokr"}
    net2.apply()
    torch.testing.assert_close(model2(x), expected)
    assert not torch.allclose(expected, base)


def test_unknown_tensors_are_reported_not_dropped(tmp_path: Path) -> None:
    _, _, path = _saved(tmp_path)
    tensors = lc.read_adapter(path).tensors()
    tensors["lycoris_0.bias_indices"] = torch.zeros(2, 3, dtype=torch.int16)
    tensors["bundle_emb.cat.string_to_param.*"] = torch.zeros(1, 8)
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd))
    f = lc.read_adapter(odd)
    assert sorted(f.unknown_tensors) == ["bundle_emb.cat.string_to_param.*", "lycoris_0.bias_indices"]
    with pytest.raises(IncompatibleBaseError, match=r"bias_indices|bundle_emb"):
        lc.load_network(odd, _model())
    net, report = lc.load_network(odd, _model(), strict=False)
    assert len(net) == 2
    assert sorted(report.unknown_tensors) == sorted(f.unknown_tensors)


def test_module_for_another_model_is_named(tmp_path: Path) -> None:
    _, _, path = _saved(tmp_path)
    other = nn.Sequential(nn.Linear(8, 16))
    with pytest.raises(IncompatibleBaseError, match="lycoris_3"):
        lc.load_network(path, other)


def test_shape_mismatch_names_the_key(tmp_path: Path) -> None:
    _, _, path = _saved(tmp_path)
    wrong = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Unflatten(1, (12, 1)), nn.Conv1d(16, 16, 3, padding=1))
    with pytest.raises(IncompatibleBaseError, match="lycoris_0"):
        lc.load_network(path, wrong)


def test_integer_factor_and_nan_are_rejected(tmp_path: Path) -> None:
    _, _, path = _saved(tmp_path)
    tensors = lc.read_adapter(path).tensors()
    bad = dict(tensors)
    bad["lycoris_0.lora_up.weight"] = bad["lycoris_0.lora_up.weight"].to(torch.int32)
    p1 = tmp_path / "int.safetensors"
    save_file(bad, str(p1))
    with pytest.raises(CorruptFileError, match=r"int\.safetensors.*lycoris_0\.lora_up\.weight"):
        lc.read_adapter(p1)
    bad = dict(tensors)
    bad["lycoris_3.lora_down.weight"] = bad["lycoris_3.lora_down.weight"].clone()
    bad["lycoris_3.lora_down.weight"][0, 0, 0] = float("nan")
    p2 = tmp_path / "nan.safetensors"
    save_file(bad, str(p2))
    with pytest.raises(CorruptFileError, match=r"nan\.safetensors.*lycoris_3\.lora_down\.weight"):
        lc.read_adapter(p2)


def test_new_weight_of_one_module_without_a_model(tmp_path: Path) -> None:
    model, net, path = _saved(tmp_path, algo="loha")
    f = lc.read_adapter(path)
    w, b = model[0].weight.detach(), model[0].bias.detach()
    new_w, new_b = f.modules["lycoris_0"].merge(w, b, multiplier=0.5)
    net.merge(0.5)
    torch.testing.assert_close(new_w, model[0].weight.detach())
    torch.testing.assert_close(new_b, b)


def test_dylora_trains_random_rank_blocks_and_saves_full_rank(tmp_path: Path) -> None:
    model = _model()
    net = lc.create_network(model, algo="dylora", dim=8, block_size=2, alpha=4.0)
    net.apply()
    net.train()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 8)
    torch.manual_seed(3)
    model(x).sum().backward()
    m = net.adapters["lycoris_0"]
    up_grad = dict(m.named_parameters())["t_lora_up__weight"].grad
    trained_cols = (up_grad.abs().sum(0) > 0).nonzero().flatten().tolist()
    assert len(trained_cols) == 2  # exactly one block of 2 ranks is trained per step
    assert trained_cols[0] % 2 == 0
    assert trained_cols[1] == trained_cols[0] + 1
    path = tmp_path / "dy.safetensors"
    net.save(path)
    f = lc.read_adapter(path)
    assert f.modules["lycoris_0"].tensors["lora_down.weight"].shape[0] == 8
    assert float(f.modules["lycoris_0"].tensors["alpha"]) == pytest.approx(8.0)  # α·block_size


@pytest.mark.parametrize(
    ("algo", "suffix", "bad_shape"),
    [
        ("lora", "lora_up.weight", (16, 3)),  # rank 3 against lora_down's rank 2
        ("loha", "hada_w2_b", (2, 7)),  # input width 7 against hada_w1_b's 8
        ("lokr", "lokr_w2_b", (3, 4)),  # rank 3 against lokr_w2_a's rank 2
    ],
)
def test_partner_shape_mismatch_is_caught_without_a_model(
    tmp_path: Path, algo: str, suffix: str, bad_shape: tuple[int, ...]
) -> None:
    net = lc.create_network(nn.Sequential(nn.Linear(8, 16)), algo=algo, dim=2, factor=2)
    tensors = net.file_tensors()
    tensors[f"lycoris_0.{suffix}"] = torch.randn(*bad_shape)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CorruptFileError, match=r"bad\.safetensors.*lycoris_0"):
        lc.read_adapter(path)


def test_saving_with_metadata_object_keeps_the_networks_own_facts(tmp_path: Path) -> None:
    from lyco_core.formats.metadata import AdapterMetadata, TrainingInfo

    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    net = lc.create_network(model, algo="lokr", preset="full", dim=4, alpha=2.0, factor=4)
    meta = AdapterMetadata(training=TrainingInfo(steps=12), output_name="x")
    net.save(tmp_path / "a.safetensors", metadata=meta)
    read = read_metadata(lc.read_adapter(tmp_path / "a.safetensors").header)
    assert read.lyco is not None
    assert read.lyco.network.algo == "lokr"  # not the schema's default "lora"
    assert read.lyco.network.dim == 4
    assert read.lyco.training is not None
    assert read.lyco.training.steps == 12
    assert json.loads(read.kohya["ss_network_args"])["algo"] == "lokr"
