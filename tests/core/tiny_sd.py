"""Tiny Stable Diffusion components built from configs (no hub): SD1-like and SDXL-like UNets, CLIP TEs."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


def tiny_sd1_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """SD 1.x block structure (4 levels, 3 cross-attention down blocks, 2 resnets per block) at tiny width."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL block structure (3 levels, no attention at level 0, transformer depth 2, text_time embedding)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16,
        use_linear_projection=True,
    ).eval()


def naming_sd1_unet() -> UNet2DConditionModel:
    """SD1 block structure (attention in down 0-2 / up 1-3, conv proj_in), widths 32/64: naming tests."""
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
    )


def naming_sdxl_unet() -> UNet2DConditionModel:
    """SDXL block structure (attention in down 1-2 / up 0-1, depths 1/2/2, text_time embedding): naming tests."""
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )


def _clip_config(hidden: int = 32, layers: int = 2) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=100,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_clip_text() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(_clip_config()).eval()


def tiny_clip_text_with_projection() -> CLIPTextModelWithProjection:
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(_clip_config(hidden=16)).eval()


def unet_inputs(unet: UNet2DConditionModel, batch: int = 1) -> dict[str, object]:
    """Random inputs for a forward pass of ``unet`` (SDXL added conditions included)."""
    g = torch.Generator().manual_seed(1)
    cfg = unet.config
    out: dict[str, object] = {
        "sample": torch.randn(batch, cfg.in_channels, 8, 8, generator=g),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(batch, 5, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        out["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 16, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    return out
