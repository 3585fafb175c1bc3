"""Lyco's metadata schema: round trip through a real file, kohya/modelspec formatting, migration, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from lyco_core.algorithms import get
from lyco_core.errors import CorruptFileError, InvalidConfigError, UnknownFormatError
from lyco_core.formats import metadata as md
from lyco_core.formats.metadata import (
    SCHEMA_VERSION,
    AdapterMetadata,
    BaseModelInfo,
    ModuleSummary,
    NetworkInfo,
    TrainingInfo,
    family_from_header,
    read_metadata,
    to_header,
)
from lyco_core.formats.safetensors_io import payload_sha256, payload_sha256_of, read_header, save_tensors

PAYLOAD = "0123456789abcdef" * 4


def lora(rank: int = 8, alpha: float = 4.0, shape: tuple[int, ...] = (320, 320), **kw: object) -> ModuleSummary:
    return ModuleSummary(algo="lora", rank=rank, alpha=alpha, shape=shape, **kw)


def meta(**kw: object) -> AdapterMetadata:
    defaults: dict[str, object] = {
        "created_at": "2024-05-06T07:08:09+00:00",
        "modules": {"lora_unet_a": lora(), "lora_unet_b": lora()},
        "base": BaseModelInfo(family="sd1"),
        "network": NetworkInfo(algo="lora", dim=8, alpha=4.0),
    }
    defaults.update(kw)
    return AdapterMetadata(**defaults)  # type: ignore[arg-type]


def assert_one_line(err: pytest.ExceptionInfo[BaseException], *parts: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)


# --------------------------------------------------------------------------------------------- round trip
def test_round_trip_through_a_real_file(tmp_path: Path) -> None:
    algo = get("lora")
    g = torch.Generator().manual_seed(0)
    file_tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, ModuleSummary] = {}
    for key, (out_f, in_f, r, a) in {"lora_unet_q": (32, 16, 4, 2.0), "lora_te_k": (16, 16, 8, 8.0)}.items():
        t = {
            "lora_down.weight": torch.randn(r, in_f, generator=g),
            "lora_up.weight": torch.randn(out_f, r, generator=g),
            "alpha": torch.tensor(a),
        }
        file_tensors.update({f"{key}.{n}": v for n, v in t.items()})
        modules[key] = ModuleSummary.from_describe(algo.describe(t), (out_f, in_f))
    m = AdapterMetadata(
        modules=modules,
        base=BaseModelInfo(family="sdxl", model_name="sd_xl_base_1.0.safetensors", model_hash="ab" * 32),
        network=NetworkInfo(algo="lora", dim=4, alpha=2.0, preset="attn-mlp", options={"conv_dim": 4}),
        training=TrainingInfo(steps=500, epochs=5, seed=7, tag_frequency={"10_cat": {"cat": 10, "solo": 3}}),
        output_name="my_cat",
        title="My cat",
        description="a cat",
        trigger_phrase="mycat",
    )
    assert m.algorithms == {"lora": 2}  # counted from the modules
    assert m.modules["lora_unet_q"] == ModuleSummary(algo="lora", rank=4, alpha=2.0, shape=(32, 16))

    payload = payload_sha256_of(file_tensors)
    path = tmp_path / "a.safetensors"
    save_tensors(path, file_tensors, to_header(m, payload))

    header = read_header(path).metadata
    assert all(isinstance(v, str) for v in header.values())
    back = read_metadata(header, source=str(path))
    assert back.lyco == m
    assert back.stored_schema_version == SCHEMA_VERSION
    assert header[md.KEY_SCHEMA_VERSION] == "1.0"
    assert back.kohya["sshs_model_hash"] == payload_sha256(path) == payload
    assert back.modelspec["modelspec.hash_sha256"] == "0x" + payload
    assert back.kohya["ss_output_name"] == "my_cat"
    assert back.kohya["ss_new_sd_model_hash"] == "ab" * 32
    assert back.kohya["ss_sd_model_name"] == "sd_xl_base_1.0.safetensors"
    assert back.kohya["ss_network_dim"] == "Dynamic"  # ranks 4 and 8
    assert back.kohya["ss_network_alpha"] == "Dynamic"
    assert back.modelspec["modelspec.title"] == "My cat"
    assert back.modelspec["modelspec.description"] == "a cat"
    assert back.modelspec["modelspec.trigger_phrase"] == "mycat"
    assert back.other == {}
    assert set(header) == {md.KEY_SCHEMA_VERSION, md.KEY_METADATA} | set(back.kohya) | set(back.modelspec)
    assert family_from_header(header)[0] == "sdxl"


def test_schema_is_strict_and_frozen() -> None:
    with pytest.raises(ValidationError):
        AdapterMetadata(unknown_field=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        BaseModelInfo(family="sd3")  # type: ignore[arg-type]
    m = meta()
    with pytest.raises(ValidationError):
        m.title = "x"  # type: ignore[misc]
    assert m.created_by.startswith("lyco-core ")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("2024-01-02T03:04:05Z", "2024-01-02T03:04:05+00:00"),
        ("2024-01-02T03:04:05", "2024-01-02T03:04:05+00:00"),
        ("2024-01-02T05:04:05.123456+02:00", "2024-01-02T03:04:05+00:00"),
    ],
)
def test_created_at_is_iso_utc(given: str, stored: str) -> None:
    assert AdapterMetadata(created_at=given).created_at == stored


def test_created_at_rejects_garbage() -> None:
    with pytest.raises(ValidationError):
        AdapterMetadata(created_at="yesterday")


# --------------------------------------------------------------------------------------------- kohya / modelspec
@pytest.mark.parametrize(
    ("family", "pred", "ss_v2", "version", "arch", "impl", "reso", "pred_out"),
    [
        ("sd1", None, "False", "sd_v1", "stable-diffusion-v1/lora", "diffusers", "512x512", "epsilon"),
        ("sd1", "v", "False", "sd_v1_v", "stable-diffusion-v1/lora", "diffusers", "512x512", "v"),
        ("sd2", "epsilon", "True", "sd_v2", "stable-diffusion-v2-512/lora", "diffusers", "512x512", "epsilon"),
        ("sd2", "v", "True", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768", "v"),
        (
            "sdxl",
            None,
            "False",
            "sdxl_base_v1-0",
            "stable-diffusion-xl-v1-base/lora",
            "https://github.com/Stability-AI/generative-models",
            "1024x1024",
            "epsilon",
        ),
    ],
)
def test_base_model_keys(
    family: str, pred: str | None, ss_v2: str, version: str, arch: str, impl: str, reso: str, pred_out: str
) -> None:
    h = to_header(meta(base=BaseModelInfo(family=family, prediction_type=pred)), PAYLOAD)  # type: ignore[arg-type]
    assert h["ss_v2"] == ss_v2
    assert h["ss_base_model_version"] == version
    assert h["modelspec.sai_model_spec"] == "1.0.1"
    assert h["modelspec.architecture"] == arch
    assert h["modelspec.implementation"] == impl
    assert h["modelspec.resolution"] == reso
    assert h["modelspec.prediction_type"] == pred_out
    assert h["modelspec.date"] == "2024-05-06T07:08:09+00:00"
    assert h["modelspec.hash_sha256"] == "0x" + PAYLOAD
    assert h["sshs_model_hash"] == PAYLOAD
    assert family_from_header(h)[0] == family


def test_minimal_kohya_set_exact() -> None:
    h = to_header(meta(), PAYLOAD)
    assert h["ss_network_module"] == "networks.lora"
    assert h["ss_network_dim"] == "8"
    assert h["ss_network_alpha"] == "4.0"
    assert h["ss_network_args"] == '{"algo": "lora"}'
    assert "ss_output_name" not in h
    assert "ss_training_comment" not in h
    assert "ss_steps" not in h
    assert h["modelspec.title"] == "lora@2024-05-06T07:08:09+00:00"
    assert not any(k.startswith("modelspec.") and k.endswith(("description", "trigger_phrase")) for k in h)


def test_network_args_are_strings() -> None:
    net = NetworkInfo(
        algo="lokr", dim=10000, alpha=1.0, preset="full", options={"factor": -1, "dora_wd": True, "dropout": 0.0}
    )
    mods = {"m": ModuleSummary(algo="lokr", rank=None, alpha=1.0, shape=(64, 64), dora="output")}
    h = to_header(meta(network=net, modules=mods), PAYLOAD)
    assert (
        h["ss_network_args"]
        == '{"algo": "lokr", "preset": "full", "factor": "-1", "dora_wd": "True", "dropout": "0.0"}'
    )
    assert all(isinstance(v, str) for v in json.loads(h["ss_network_args"]).values())
    assert h["ss_network_module"] == "lycoris.kohya"
    assert h["ss_network_dim"] == "10000"  # no module has a rank: the network default
    assert h["ss_network_alpha"] == "1.0"


@pytest.mark.parametrize(
    ("modules", "module_name"),
    [
        ({"a": lora(), "b": lora(shape=(320, 320, 3, 3))}, "networks.lora"),  # LoCon is plain kohya LoRA
        ({"a": lora(), "b": lora(extra={"tucker": True})}, "lycoris.kohya"),
        ({"a": lora(), "b": lora(dora="output")}, "lycoris.kohya"),
        ({"a": lora(), "b": ModuleSummary(algo="loha", rank=8, alpha=4.0, shape=(320, 320))}, "lycoris.kohya"),
        ({}, "lycoris.kohya"),
    ],
)
def test_network_module(modules: dict[str, ModuleSummary], module_name: str) -> None:
    assert to_header(meta(modules=modules), PAYLOAD)["ss_network_module"] == module_name


def test_dynamic_dim_and_alpha() -> None:
    same_rank = {"a": lora(8, 4.0), "b": lora(8, 1.0)}
    h = to_header(meta(modules=same_rank), PAYLOAD)
    assert (h["ss_network_dim"], h["ss_network_alpha"]) == ("8", "Dynamic")
    same_alpha = {"a": lora(4, 2.0), "b": lora(16, 2)}
    h = to_header(meta(modules=same_alpha), PAYLOAD)
    assert (h["ss_network_dim"], h["ss_network_alpha"]) == ("Dynamic", "2.0")
    unknown = to_header(meta(modules={}, network=NetworkInfo()), PAYLOAD)
    assert (unknown["ss_network_dim"], unknown["ss_network_alpha"]) == ("None", "None")  # sd-scripts' str(None)
    # the network default does not hide what the modules say
    h = to_header(meta(modules={"a": lora(16, 16.0)}, network=NetworkInfo(dim=4, alpha=1.0)), PAYLOAD)
    assert (h["ss_network_dim"], h["ss_network_alpha"]) == ("16", "16.0")


def test_training_keys_exact() -> None:
    training = TrainingInfo(
        steps=1000,
        epochs=10,
        num_epochs=12,
        max_train_steps=1200,
        learning_rate=1e-4,
        unet_lr=0.0005,
        text_encoder_lr=5e-05,
        lr_scheduler="cosine",
        optimizer="torch.optim.AdamW(weight_decay=0.01)",
        seed=42,
        batch_size=2,
        num_train_images=200,
        resolution=(512, 768),
        clip_skip=2,
        mixed_precision="bf16",
        started_at=1700000000.5,
        comment="first try",
        tag_frequency={"10_cat": {"cat": 20, "1girl": 3}},
        dataset_dirs={"10_cat": {"n_repeats": 10, "img_count": 20}},
        dataset={"captions": "txt"},
        extra={"ema": False},
    )
    h = to_header(meta(training=training), PAYLOAD)
    expected = {
        "ss_steps": "1000",
        "ss_epoch": "10",
        "ss_num_epochs": "12",
        "ss_max_train_steps": "1200",
        "ss_learning_rate": "0.0001",
        "ss_unet_lr": "0.0005",
        "ss_text_encoder_lr": "5e-05",
        "ss_lr_scheduler": "cosine",
        "ss_optimizer": "torch.optim.AdamW(weight_decay=0.01)",
        "ss_seed": "42",
        "ss_batch_size_per_device": "2",
        "ss_num_train_images": "200",
        "ss_resolution": "(512, 768)",
        "ss_clip_skip": "2",
        "ss_mixed_precision": "bf16",
        "ss_training_started_at": "1700000000.5",
        "ss_training_comment": "first try",
        "ss_tag_frequency": '{"10_cat": {"cat": 20, "1girl": 3}}',
        "ss_dataset_dirs": '{"10_cat": {"n_repeats": 10, "img_count": 20}}',
    }
    assert {k: h[k] for k in expected} == expected
    assert "ss_training_finished_at" not in h
    assert "ss_noise_offset" not in h
    assert h["modelspec.resolution"] == "512x768"
    assert h["modelspec.encoder_layer"] == "2"
    assert read_metadata(h).lyco.training == training  # type: ignore[union-attr]


def test_unknown_family_and_explicit_architecture() -> None:
    h = to_header(meta(base=BaseModelInfo()), PAYLOAD)
    assert "ss_v2" not in h
    assert "ss_base_model_version" not in h
    assert not any(k.startswith("modelspec.") for k in h)
    assert h["sshs_model_hash"] == PAYLOAD
    assert family_from_header(h) == ("unknown", [])

    h = to_header(meta(base=BaseModelInfo(architecture="stable-diffusion-v2-768-v")), PAYLOAD)
    assert h["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert (h["ss_v2"], h["ss_base_model_version"], h["modelspec.prediction_type"]) == ("True", "sd_v2_v", "v")
    assert h["modelspec.resolution"] == "768x768"


def test_payload_argument_checked() -> None:
    assert to_header(meta(), "0x" + PAYLOAD.upper())["sshs_model_hash"] == PAYLOAD
    with pytest.raises(InvalidConfigError) as e:
        to_header(meta(), "abc")
    assert_one_line(e, "payload_sha256")


# --------------------------------------------------------------------------------------------- reading / versions
def header_with(doc: dict, version: str | None) -> dict[str, str]:
    h = {md.KEY_METADATA: json.dumps(doc)}
    if version is not None:
        h[md.KEY_SCHEMA_VERSION] = version
    return h


V09_DOC = {
    "schema_version": "0.9",
    "created_by": "lyco-core 0.0.9",
    "created_at": "2024-01-01T00:00:00+00:00",
    "family": "sd2",
    "v_prediction": True,
    "modules": {"lora_unet_x": {"algo": "loha", "rank": 4, "alpha": 1.0, "shape": [8, 8]}},
    "network": {"algo": "loha", "dim": 4, "alpha": 1.0},
}


def test_migration_from_0_9() -> None:
    r = read_metadata(header_with(V09_DOC, "0.9"))
    assert r.stored_schema_version == "0.9"
    m = r.lyco
    assert m is not None
    assert m.schema_version == SCHEMA_VERSION
    assert m.base == BaseModelInfo(family="sd2", prediction_type="v")
    assert m.algorithms == {"loha": 1}
    assert m.modules["lora_unet_x"].shape == (8, 8)
    # written back, it is a 1.0 file
    h = to_header(m, PAYLOAD)
    assert h[md.KEY_SCHEMA_VERSION] == "1.0"
    assert json.loads(h[md.KEY_METADATA])["schema_version"] == "1.0"
    assert read_metadata(h).lyco == m
    # 1.0 itself has no top-level family: without the migration the document is refused
    with pytest.raises(CorruptFileError) as e:
        read_metadata(header_with({**V09_DOC, "schema_version": "1.0"}, "1.0"))
    assert_one_line(e, "lyco.metadata", "family")


def test_migrations_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    def from_0_8(doc: dict) -> dict:  # pretend 0.8 called the family "base_family"
        doc = dict(doc)
        doc["family"] = doc.pop("base_family")
        return doc

    monkeypatch.setitem(md.MIGRATIONS, "0.8", ("0.9", from_0_8))
    doc = {k: v for k, v in V09_DOC.items() if k not in ("family", "schema_version")}
    r = read_metadata(header_with({**doc, "base_family": "sdxl"}, "0.8"))
    assert r.lyco is not None
    assert r.lyco.base.family == "sdxl"
    assert r.lyco.schema_version == "1.0"
    with pytest.raises(UnknownFormatError) as e:
        read_metadata(header_with(doc, "0.5"))
    assert_one_line(e, "0.5", "older")


def test_newer_major_refused() -> None:
    with pytest.raises(UnknownFormatError) as e:
        read_metadata(header_with({"schema_version": "2.0", "whatever": 1}, "2.0"), source="new.safetensors")
    assert_one_line(e, "new.safetensors", "lyco.schema_version", "newer Lyco (schema 2.0 > 1.0)", "upgrade lyco-core")


def test_newer_minor_read_leniently() -> None:
    doc = json.loads(to_header(meta(), PAYLOAD)[md.KEY_METADATA])
    doc.update(schema_version="1.7", future_field={"x": 1})
    doc["base"]["future_base_field"] = "y"
    r = read_metadata(header_with(doc, "1.7"))
    assert r.lyco is not None
    assert r.stored_schema_version == "1.7"
    assert r.lyco.modules == meta().modules
    assert r.lyco.base.family == "sd1"


@pytest.mark.parametrize(
    ("header", "parts"),
    [
        ({md.KEY_SCHEMA_VERSION: "1.0", md.KEY_METADATA: "{not json"}, ["lyco.metadata", "not valid JSON"]),
        ({md.KEY_SCHEMA_VERSION: "1.0", md.KEY_METADATA: "[1, 2]"}, ["lyco.metadata", "not an object"]),
        ({md.KEY_SCHEMA_VERSION: "1.0"}, ["lyco.metadata", "missing"]),
        ({md.KEY_SCHEMA_VERSION: "one", md.KEY_METADATA: "{}"}, ["lyco.schema_version", "MAJOR.MINOR"]),
        ({md.KEY_METADATA: "{}"}, ["lyco.metadata", "schema_version"]),
        ({md.KEY_SCHEMA_VERSION: "1.0", md.KEY_METADATA: '{"schema_version": "0.9"}'}, ["lyco.schema_version"]),
        (
            {md.KEY_SCHEMA_VERSION: "1.0", md.KEY_METADATA: '{"modules": {"k": {"algo": "lora"}}}'},
            ["lyco.metadata", "modules.k.shape"],
        ),
    ],
)
def test_bad_lyco_metadata_refused(header: dict[str, str], parts: list[str]) -> None:
    with pytest.raises(CorruptFileError) as e:
        read_metadata(header, source="bad.safetensors")
    assert_one_line(e, "bad.safetensors", *parts)


def test_garbage_json_in_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    save_tensors(path, {"a": torch.ones(1)}, {md.KEY_SCHEMA_VERSION: "1.0", md.KEY_METADATA: '{"x": '})
    with pytest.raises(CorruptFileError) as e:
        read_metadata(read_header(path).metadata, source=str(path))
    assert_one_line(e, "g.safetensors", "lyco.metadata")


# --------------------------------------------------------------------------------------------- other tools' files
KOHYA_SD15 = {
    "ss_session_id": "1234567",
    "ss_training_started_at": "1690000000.123",
    "ss_output_name": "style_v1",
    "ss_learning_rate": "0.0001",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "32",
    "ss_network_alpha": "16.0",
    "ss_v2": "False",
    "ss_base_model_version": "sd_v1",
    "ss_tag_frequency": '{"5_style": {"style": 40}}',
    "sshs_model_hash": "f" * 64,
    "sshs_legacy_hash": "abcdef12",
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.title": "style_v1",
}


def test_kohya_only_file(tmp_path: Path) -> None:
    path = tmp_path / "kohya.safetensors"
    save_tensors(path, {"lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, KOHYA_SD15)
    r = read_metadata(read_header(path).metadata)
    assert r.lyco is None
    assert r.stored_schema_version is None
    assert r.kohya == {k: v for k, v in KOHYA_SD15.items() if k.startswith("ss")}
    assert r.modelspec == {k: v for k, v in KOHYA_SD15.items() if k.startswith("modelspec.")}
    assert r.other == {}
    family, evidence = family_from_header(KOHYA_SD15)
    assert family == "sd1"
    assert evidence[0] == "ss_base_model_version='sd_v1' → sd1"
    assert len(evidence) == 3


def test_diffusers_and_ai_toolkit_and_empty_headers(tmp_path: Path) -> None:
    diffusers = {
        "lora_adapter_metadata": json.dumps({"unet": {"r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}}),
        "format": "pt",
    }
    r = read_metadata(diffusers)
    assert r.lyco is None
    assert r.other == diffusers
    assert r.kohya == r.modelspec == {}
    assert family_from_header(diffusers) == ("unknown", [])

    ai_toolkit = {
        "software": '{"name": "ai-toolkit", "version": "0.1.0"}',
        "name": "my_lora",
        "training_info": '{"step": 100}',
        "ss_base_model_version": "sdxl_base_v1-0",
        "sshs_model_hash": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    }
    r = read_metadata(ai_toolkit)
    assert set(r.other) == {"software", "name", "training_info"}
    assert set(r.kohya) == {"ss_base_model_version", "sshs_model_hash"}
    assert family_from_header(ai_toolkit)[0] == "sdxl"

    path = tmp_path / "bare.safetensors"
    save_tensors(path, {"a": torch.ones(1)})
    assert read_metadata(read_header(path).metadata) == md.ReadMetadata()
    assert read_metadata({}) == md.ReadMetadata()


@pytest.mark.parametrize(
    ("header", "family", "evidence_part"),
    [
        ({"ss_v2": "True"}, "sd2", "ss_v2='True' → sd2"),
        ({"ss_v2": "False"}, "sd1", "ss_v2='False' → sd1"),
        ({"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0"}, "sdxl", "ss_v2='False' → not sd2"),
        ({"modelspec.architecture": "stable-diffusion-v2-512/lora"}, "sd2", "→ sd2"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl", "→ sdxl"),
        ({"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}, "unknown", "flux1"),
        (
            {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-v1/lora"},
            "sdxl",
            "conflict: modelspec.architecture says sd1",
        ),
        ({"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}, "sd2", "sd_v2_v"),
    ],
)
def test_family_from_header(header: dict[str, str], family: str, evidence_part: str) -> None:
    got, evidence = family_from_header(header)
    assert got == family
    assert any(evidence_part in line for line in evidence), evidence
