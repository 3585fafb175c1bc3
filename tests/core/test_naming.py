"""kohya/LyCORIS module keys: canonical keys, aliases, and diffusers' own kohya reader on tiny real models."""

from __future__ import annotations

import re
from typing import ClassVar

import pytest
import torch
from tiny_sd import naming_sd1_unet, naming_sdxl_unet

from lyco_core.errors import InvalidConfigError, UnknownFormatError
from lyco_core.formats.naming import (
    ROLE_PREFIX,
    build_key_index,
    canonical_key,
    component_kind,
    file_path,
    guess_role,
    module_key,
    split_key,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.lora_pipeline import (  # noqa: E402
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)

RANK = 2
ALPHA = 1.0  # one alpha for all: diffusers 0.42 drops per-module alphas of attention processors (see report)


def tiny_clip_config() -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=8,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


@pytest.fixture(scope="module")
def sd1_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return naming_sd1_unet()


@pytest.fixture(scope="module")
def sdxl_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return naming_sdxl_unet()


@pytest.fixture(scope="module")
def clip() -> torch.nn.Module:
    return transformers.CLIPTextModel(tiny_clip_config())


@pytest.fixture(scope="module")
def clip_proj() -> torch.nn.Module:
    return transformers.CLIPTextModelWithProjection(tiny_clip_config())


def adapted_paths(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


Q_PROJ = "encoder.layers.0.self_attn.q_proj"
Q_KEY = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
SD1_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
SDXL_ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


# ----- plain helpers -----------------------------------------------------------------------------------------------
def test_module_key_and_split_key() -> None:
    assert (
        module_key("lora_unet", "down_blocks.0.attentions.0.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    )
    assert module_key("lycoris", "") == "lycoris"
    assert split_key("lora_unet_a_b.lora_up.weight") == ("lora_unet_a_b", "lora_up.weight")
    assert split_key("lora_te_x.alpha") == ("lora_te_x", "alpha")
    for bad in ("lora_unet_a_b", ".alpha", "lora_unet_a."):
        with pytest.raises(UnknownFormatError, match=re.escape(repr(bad))):
            split_key(bad)


def test_role_prefix_table() -> None:
    assert ROLE_PREFIX["unet"] == "lora_unet"
    assert ROLE_PREFIX["te"] == ROLE_PREFIX["text_encoder"] == "lora_te"
    assert ROLE_PREFIX["te1"] == "lora_te1"
    assert ROLE_PREFIX["te2"] == ROLE_PREFIX["text_encoder_2"] == "lora_te2"
    assert ROLE_PREFIX["lycoris"] == "lycoris"
    with pytest.raises(TypeError):
        ROLE_PREFIX["x"] = "y"  # type: ignore[index]


def test_guess_role_and_kind(
    sd1_unet: torch.nn.Module, sdxl_unet: torch.nn.Module, clip: torch.nn.Module, clip_proj: torch.nn.Module
) -> None:
    assert guess_role(sd1_unet) == guess_role(sdxl_unet) == "unet"
    assert guess_role(clip) == guess_role(clip_proj) == "te"
    assert guess_role(torch.nn.Linear(2, 2)) == "lycoris"
    assert component_kind(sd1_unet) == "sd_unet"
    assert component_kind(sdxl_unet) == "sdxl_unet"
    assert component_kind(clip) == "clip_text_flat"
    assert component_kind(clip_proj) == "clip_text"
    assert component_kind(torch.nn.Linear(2, 2)) == "generic"


# ----- canonical keys ----------------------------------------------------------------------------------------------
def test_text_encoder_keys(clip: torch.nn.Module, clip_proj: torch.nn.Module) -> None:
    assert not hasattr(clip, "text_model")  # transformers 5 layout: the text_model level is gone
    assert canonical_key(clip, "te", Q_PROJ) == Q_KEY
    assert canonical_key(clip_proj, "te", "text_model." + Q_PROJ) == Q_KEY
    assert canonical_key(clip_proj, "te2", "text_model.encoder.layers.1.mlp.fc2") == (
        "lora_te2_text_model_encoder_layers_1_mlp_fc2"
    )
    assert canonical_key(clip_proj, "te2", "text_projection") == "lora_te2_text_projection"
    assert file_path(clip, "te1", "") == "text_model"
    # the generic wrapper names raw module paths
    assert canonical_key(clip, "lycoris", Q_PROJ) == "lycoris_" + Q_PROJ.replace(".", "_")
    paths = {n for n, _ in clip.named_modules()}
    for name, _ in clip_proj.named_modules():
        if name.startswith("text_model."):
            assert file_path(clip_proj, "te", name) == name
            if name.removeprefix("text_model.") in paths:
                assert file_path(clip, "te", name.removeprefix("text_model.")) == name


def test_unet_keys(sd1_unet: torch.nn.Module, sdxl_unet: torch.nn.Module) -> None:
    assert (
        canonical_key(sd1_unet, "unet", SD1_ATTN)
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert canonical_key(sdxl_unet, "unet", SDXL_ATTN) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert canonical_key(sdxl_unet, "unet", "up_blocks.1.upsamplers.0.conv") == "lora_unet_output_blocks_5_2_conv"
    assert canonical_key(sdxl_unet, "unet", "add_embedding.linear_1") == "lora_unet_label_emb_0_0"
    assert canonical_key(sdxl_unet, "lycoris", SDXL_ATTN) == "lycoris_" + SDXL_ATTN.replace(".", "_")
    with pytest.raises(UnknownFormatError, match="time_proj"):
        canonical_key(sdxl_unet, "unet", "time_proj")
    with pytest.raises(InvalidConfigError, match="te3"):
        canonical_key(sd1_unet, "te3", SD1_ATTN)


def test_sdxl_detected_by_cross_attention_dim() -> None:
    class UNet2DConditionModel(torch.nn.Module):  # stand-in with SDXL's config, no text_time embedding
        config: ClassVar[dict[str, object]] = {
            "cross_attention_dim": 2048,
            "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        }

    unet = UNet2DConditionModel()
    assert component_kind(unet) == "sdxl_unet"
    assert file_path(unet, "unet", "up_blocks.0.attentions.2.proj_out") == "output_blocks.2.1.proj_out"


# ----- key index ---------------------------------------------------------------------------------------------------
def test_key_index_unet(sd1_unet: torch.nn.Module, sdxl_unet: torch.nn.Module) -> None:
    for unet, canonical_is_ldm in ((sd1_unet, False), (sdxl_unet, True)):
        paths = adapted_paths(unet)
        index = build_key_index(unet, "unet", paths)
        layout_ldm = {p: file_path(sdxl_unet, "unet", p) for p in paths} if canonical_is_ldm else None
        for path in paths:
            diffusers_key = module_key("lora_unet", path)
            canonical = canonical_key(unet, "unet", path)
            assert index[canonical] == path
            assert index[diffusers_key] == path
            assert index[module_key("lycoris", path)] == path
            if layout_ldm is not None:
                assert canonical == module_key("lora_unet", layout_ldm[path])
                assert canonical != diffusers_key
        assert index["lora_unet_input_blocks_4_1_proj_in"] == "down_blocks.1.attentions.0.proj_in"
        assert index["lora_unet_down_blocks_1_attentions_0_proj_in"] == "down_blocks.1.attentions.0.proj_in"
        assert index["lora_unet_middle_block_2_in_layers_2"] == "mid_block.resnets.1.conv1"
        assert index["lora_unet_out_2"] == "conv_out"
        assert len(set(index.values())) == len(paths)
        # every path has 3 distinct keys: diffusers-named, LDM-named, lycoris_
        assert len(index) == 3 * len(paths)


def test_key_index_unet_all_named_modules(sdxl_unet: torch.nn.Module) -> None:
    """Containers and modules with no LDM name are indexed under their diffusers-named keys only."""
    index = build_key_index(sdxl_unet, "unet", [n for n, _ in sdxl_unet.named_modules()])
    assert index["lora_unet_time_proj"] == "time_proj"
    assert "lora_unet_down_blocks_0" in index
    assert index["lora_unet"] == ""


def test_key_index_text_encoders(clip: torch.nn.Module, clip_proj: torch.nn.Module) -> None:
    for te, path in ((clip, Q_PROJ), (clip_proj, "text_model." + Q_PROJ)):
        index = build_key_index(te, "te", adapted_paths(te))
        for key in (
            Q_KEY,
            "lora_te_encoder_layers_0_self_attn_q_proj",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te1_encoder_layers_0_self_attn_q_proj",
        ):
            assert index[key] == path
        assert not any(k.startswith(("lora_te2", "lycoris")) for k in index)
        index2 = build_key_index(te, "te2", adapted_paths(te))
        assert index2["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"] == path
        assert not any(k.startswith(("lora_te_", "lora_te1_")) for k in index2)
    index = build_key_index(clip_proj, "te1", ["text_projection"])
    assert index == {"lora_te1_text_projection": "text_projection", "lora_te_text_projection": "text_projection"}


def test_key_index_ambiguous_names_raise() -> None:
    model = torch.nn.Module()
    model.a = torch.nn.Module()
    model.a.b_c = torch.nn.Linear(2, 2)
    model.a_b = torch.nn.Module()
    model.a_b.c = torch.nn.Linear(2, 2)
    with pytest.raises(UnknownFormatError, match=r"ambiguous key 'lycoris_a_b_c'.*'a\.b_c'.*'a_b\.c'"):
        build_key_index(model, "lycoris", adapted_paths(model))
    assert build_key_index(model, "lycoris", ["a.b_c"]) == {"lycoris_a_b_c": "a.b_c"}


# ----- diffusers' own kohya reader ---------------------------------------------------------------------------------
def kohya_lora(model: torch.nn.Module, role: str, paths: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """A kohya LoRA state dict over ``paths`` with random factors; also returns path → (down, up)."""
    state: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path in paths:
        layer = model.get_submodule(path)
        if isinstance(layer, torch.nn.Linear):
            down, up = torch.randn(RANK, layer.in_features), torch.randn(layer.out_features, RANK)
        else:
            down = torch.randn(RANK, layer.in_channels, *layer.kernel_size)
            up = torch.randn(layer.out_channels, RANK, 1, 1)
        key = canonical_key(model, role, path)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(ALPHA)
        factors[path] = (down, up)
    return state, factors


def assert_injected(model: torch.nn.Module, factors: dict, adapter: str) -> None:
    """Every module got a PEFT LoRA layer holding exactly its own factors, and nothing else got one."""
    injected = {n for n, m in model.named_modules() if adapter in getattr(m, "lora_A", {})}
    assert injected == set(factors)
    for path, (down, up) in factors.items():
        layer = model.get_submodule(path)
        assert torch.equal(layer.lora_A[adapter].weight, down.reshape(layer.lora_A[adapter].weight.shape)), path
        assert torch.equal(layer.lora_B[adapter].weight, up.reshape(layer.lora_B[adapter].weight.shape)), path
        assert layer.scaling[adapter] == pytest.approx(ALPHA / RANK), path


@pytest.mark.parametrize(
    ("family", "mixin"), [("sd1", StableDiffusionLoraLoaderMixin), ("sdxl", StableDiffusionXLLoraLoaderMixin)]
)
def test_diffusers_kohya_reader_maps_every_unet_key(family: str, mixin: type) -> None:
    """SD1 keys (diffusers names) and SDXL keys (LDM names) for every Linear/Conv2d, conv ones included."""
    torch.manual_seed(1)
    unet = naming_sd1_unet() if family == "sd1" else naming_sdxl_unet()
    paths = adapted_paths(unet)
    state, factors = kohya_lora(unet, "unet", paths)
    marker = "_down_blocks_" if family == "sd1" else "_input_blocks_"
    assert any(marker in k for k in state)
    assert not any(("_input_blocks_" if family == "sd1" else "_down_blocks_") in k for k in state)
    converted, alphas = mixin.lora_state_dict(dict(state), unet_config=unet.config)
    assert len(converted) == 2 * len(paths)
    mixin.load_lora_into_unet(converted, alphas, unet, adapter_name="t")
    assert_injected(unet, factors, "t")


def test_diffusers_kohya_reader_maps_text_encoder_keys() -> None:
    """``lora_te_text_model_*`` keys of a transformers-5 CLIPTextModel load into the right modules."""
    torch.manual_seed(2)
    te = transformers.CLIPTextModel(tiny_clip_config())
    paths = adapted_paths(te)
    state, factors = kohya_lora(te, "te", paths)
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in state)
    converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(state))
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(converted, alphas, te, adapter_name="t")
    assert_injected(te, factors, "t")
