"""Base-family verdicts from shapes (real SD1/SD2/SDXL widths, as meta tensors), key naming and metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_files import make_adapter
from tiny_sd import tiny_clip_text, tiny_clip_text_with_projection, tiny_sdxl_unet

import lyco_core as lc
from lyco_core.files import AdapterFile, group_modules
from lyco_core.ops.family import adapter_family


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def lora(out: int, inp: int, *kernel: int, rank: int = 4) -> dict[str, torch.Tensor]:
    ones = (1,) * len(kernel)
    return {"lora_down.weight": _meta(rank, inp, *kernel), "lora_up.weight": _meta(out, rank, *ones),
            "alpha": torch.tensor(1.0)}


def adapter(modules: dict[str, dict[str, torch.Tensor]], header: dict[str, str] | None = None) -> AdapterFile:
    tensors = {f"{k}.{n}": t for k, t_ in modules.items() for n, t in t_.items()}
    mods, unknown = group_modules(tensors)
    assert not unknown
    return AdapterFile(None, mods, unknown, header or {})


SD1_ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SD1 = {
    SD1_ATTN: lora(320, 768),
    "lora_unet_down_blocks_0_attentions_0_proj_in": lora(320, 320, 1, 1),
    "lora_te_text_model_encoder_layers_11_self_attn_q_proj": lora(768, 768),
}
SD2 = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v": lora(320, 1024),
    "lora_unet_down_blocks_0_attentions_0_proj_in": lora(320, 320),
    "lora_te_text_model_encoder_layers_22_mlp_fc1": lora(4096, 1024),
}
SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": lora(640, 2048),
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": lora(640, 640),
    "lora_unet_input_blocks_4_1_proj_in": lora(640, 640),
    "lora_te1_text_model_encoder_layers_11_self_attn_q_proj": lora(768, 768),
    "lora_te2_text_model_encoder_layers_31_self_attn_q_proj": lora(1280, 1280),
}


@pytest.mark.parametrize(("modules", "family"), [(SD1, "sd1"), (SD2, "sd2"), (SDXL, "sdxl")])
def test_real_shapes_without_metadata(modules: dict[str, dict[str, torch.Tensor]], family: str) -> None:
    v = adapter_family(adapter(modules))
    assert v.family == family
    assert v.candidates == [family]
    assert v.conflicts == []
    assert v.evidence[0].startswith("cross-attention width")
    assert v.evidence[0].endswith(f"→ {family}")


@pytest.mark.parametrize(
    ("tensors", "family"),
    [
        # LoHa: in-dim from hada_w1_b (r, I)
        ({"hada_w1_a": _meta(320, 4), "hada_w1_b": _meta(4, 1024), "hada_w2_a": _meta(320, 4),
          "hada_w2_b": _meta(4, 1024), "alpha": torch.tensor(1.0)}, "sd2"),
        # LoKr: (8×32) ⊗ (40×64) = 320×2048
        ({"lokr_w1": _meta(8, 32), "lokr_w2_a": _meta(40, 4), "lokr_w2_b": _meta(4, 64), "alpha": torch.tensor(4.0)},
         "sdxl"),
        # Full: the diff's own shape
        ({"diff": _meta(320, 768)}, "sd1"),
        # GLoRA: a1 (I, r)
        ({"a1.weight": _meta(1024, 4), "a2.weight": _meta(4, 1024), "b1.weight": _meta(320, 4),
          "b2.weight": _meta(4, 1024), "alpha": torch.tensor(4.0)}, "sd2"),
        # input-side (IA)³: the vector has I entries
        ({"weight": _meta(2048), "on_input": torch.tensor(1)}, "sdxl"),
    ],
)
def test_width_from_other_algorithms(tensors: dict[str, torch.Tensor], family: str) -> None:
    v = adapter_family(adapter({SD1_ATTN: tensors}))
    assert v.family == family, v.evidence


def test_output_side_ia3_and_oft_give_no_width() -> None:
    v = adapter_family(adapter({"lora_unet_x_attn2_to_k": {"weight": _meta(320), "on_input": torch.tensor(0)},
                                "lora_unet_x_attn2_to_v": {"oft_blocks": _meta(80, 4, 4)}}))
    assert v.family == "unknown"
    assert v.candidates == ["sd1", "sd2", "sdxl"]
    assert not any("cross-attention" in e for e in v.evidence)


def test_metadata_decides_when_shapes_and_names_cannot() -> None:
    header = {"ss_base_model_version": "sd_v2", "ss_v2": "True"}
    v = adapter_family(adapter({"lycoris_0": lora(16, 16)}, header))
    assert v.family == "sd2"
    assert any("ss_base_model_version='sd_v2'" in e for e in v.evidence)


def test_stronger_evidence_wins_and_conflict_is_reported() -> None:
    header = {"ss_base_model_version": "sdxl_base_v1-0"}
    v = adapter_family(adapter(SD1, header))
    assert v.family == "sd1"
    assert len(v.conflicts) == 1
    assert "sdxl" in v.conflicts[0]
    assert "stronger evidence says sd1" in v.conflicts[0]


def test_partial_evidence_leaves_candidates() -> None:
    v = adapter_family(adapter({"lora_unet_down_blocks_1_attentions_0_proj_in": lora(640, 640)}))
    assert v.family == "unknown"
    assert v.candidates == ["sd2", "sdxl"]
    # a 4-D proj_in alone is SD1
    assert adapter_family(adapter({"lora_unet_down_blocks_1_attentions_0_proj_in": lora(64, 64, 1, 1)})).family == "sd1"


def test_naming_rules() -> None:
    # LDM names with attention at the first level are SD1/SD2, not SDXL; the TE layer count says SD2
    v = adapter_family(adapter({"lora_unet_input_blocks_1_1_proj_out": lora(16, 16),
                                "lora_te_text_model_encoder_layers_15_mlp_fc2": lora(16, 16)}))
    assert v.family == "sd2"
    # LDM names alone: what sd-scripts writes for SDXL
    assert adapter_family(adapter({"lora_unet_middle_block_1_proj_out": lora(16, 16)})).family == "sdxl"
    # diffusers names: attention in up_blocks_0 exists in SDXL only
    assert adapter_family(adapter({"lora_unet_up_blocks_0_attentions_0_proj_out": lora(16, 16)})).family == "sdxl"
    # lora_te1 without lora_te2 decides nothing (some tools write it for SD1)
    v = adapter_family(adapter({"lora_te1_text_model_encoder_layers_0_mlp_fc1": lora(16, 16)}))
    assert v.family == "unknown"
    assert any("lora_te1_" in e for e in v.evidence)


def test_tiny_files(tmp_path: Path) -> None:
    # tiny widths decide nothing; SD1 naming and the metadata do
    f = lc.read_adapter(make_adapter(tmp_path / "sd1.safetensors", "loha"))
    v = adapter_family(f)
    assert v.family == "sd1"
    assert any("matches no SD family" in e for e in v.evidence)
    # an SDXL-layout network saved without a family: names alone (te2, transformer depth 2, LDM keys)
    models = {"unet": tiny_sdxl_unet(), "te1": tiny_clip_text(), "te2": tiny_clip_text_with_projection()}
    lc.create_network(models, algo="lora", dim=2, preset="attn-mlp").save(tmp_path / "xl.safetensors")
    f = lc.read_adapter(tmp_path / "xl.safetensors")
    assert "ss_base_model_version" not in f.header
    v = adapter_family(f)
    assert v.family == "sdxl"
    assert any("lora_te2_" in e for e in v.evidence)
