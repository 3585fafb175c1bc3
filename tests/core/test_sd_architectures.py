"""Presets and key naming on the real SD 1.5 and SDXL architectures (built on the meta device: no memory).

Module counts are the ones kohya's `networks.lora` creates on the same models (ecosystem-formats spec §1.1).
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import lyco_core as lc

LOCON_PRESET = {
    "unet": {"target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]},
    "text_encoder": {"target_module": ["CLIPAttention", "CLIPMLP"]},
}


def _sd15() -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12))
    return {"unet": unet, "te": te}


def _sdxl() -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            use_linear_projection=True,
        )
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         projection_dim=1280))
    return {"unet": unet, "te1": te1, "te2": te2}


def _count(net: lc.AdapterNetwork, prefix: str) -> int:
    return sum(1 for m in net if m.key.startswith(prefix + "_"))


@pytest.mark.parametrize(("preset", "unet_modules"), [("attn-mlp", 192), (LOCON_PRESET, 278), ("full", 282)])
def test_sd15_counts(preset: object, unet_modules: int) -> None:
    net = lc.create_network(_sd15(), preset=preset, algo="lora", dim=4)
    assert _count(net, "lora_unet") == unet_modules
    assert _count(net, "lora_te") == 72
    keys = {m.key for m in net}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in keys
    assert "lora_te_text_model_encoder_layers_11_self_attn_q_proj" in keys


def test_sdxl_counts_and_ldm_keys() -> None:
    net = lc.create_network(_sdxl(), preset=LOCON_PRESET, algo="lora", dim=4)
    assert _count(net, "lora_te1") == 72
    assert _count(net, "lora_te2") == 192
    assert _count(net, "lora_unet") == 788
    attn = lc.create_network(_sdxl(), preset="attn-mlp", algo="lora", dim=4)
    assert _count(attn, "lora_unet") == 722
    keys = {m.key for m in net}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in keys
    assert "lora_unet_output_blocks_2_2_conv" in keys
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in keys
    assert not any(re.match(r"lora_unet_(down|up|mid)_block", k) for k in keys)


def test_cross_attention_widths_tell_the_family() -> None:
    sd15 = lc.create_network(_sd15(), preset="attn-only", algo="lora", dim=4)
    k = next(m for m in sd15 if m.key.endswith("attn2_to_k"))
    assert k.layer.in_features == 768
    sdxl = lc.create_network(_sdxl(), preset="attn-only", algo="lora", dim=4)
    k = next(m for m in sdxl if m.key.endswith("attn2_to_k"))
    assert k.layer.in_features == 2048
