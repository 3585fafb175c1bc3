"""Model-free kohya key ↔ module path parsing (lyco_core.formats.key_paths) against real module trees."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from tiny_sd import naming_sdxl_unet, tiny_clip_text, tiny_clip_text_with_projection, tiny_sd1_unet
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import lyco_core as lc
from lyco_core.errors import UnknownFormatError
from lyco_core.formats import key_paths as kpm
from lyco_core.formats.key_paths import (
    KeyPath,
    format_key,
    parse_key,
    parse_path,
    to_diffusers_path,
    to_ldm_path,
    with_naming,
)
from lyco_core.formats.unet_naming import UNetLayout, diffusers_to_ldm


def _paths(component: torch.nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in component.named_modules()}


def _file_te_path(te: torch.nn.Module, path: str) -> str:
    """kohya files keep ``text_model.`` even where transformers 5 dropped it."""
    return path if hasattr(te, "text_model") else f"text_model.{path}"


def test_tiny_sd1_every_written_key_parses_to_its_module() -> None:
    model = {"unet": tiny_sd1_unet(), "te": tiny_clip_text()}
    net = lc.create_network(model, preset="full", algo="lora", dim=2)
    ids = {role: _paths(c) for role, c in model.items()}
    seen = {"unet": 0, "te": 0}
    for m in net:
        kp = parse_key(m.key)
        real = ids[kp.role][id(m.base)]
        if kp.role == "unet":
            assert kp.naming == "diffusers"
            assert kp.path == real
            assert kp.component == "unet"
            assert to_diffusers_path(kp, "sd1") == real
            assert to_ldm_path(kp, "sd1") == diffusers_to_ldm(real, UNetLayout.for_family("sd1"))
        else:
            assert kp.naming == "clip"
            assert kp.path == _file_te_path(model["te"], real)
            assert kp.component == "text_encoder"
        assert kp.key == m.key == format_key(kp.role, kp.path)
        seen[kp.role] += 1
    assert seen["unet"] > 100
    assert seen["te"] == 12


def test_tiny_sdxl_ldm_keys_map_to_diffusers_modules() -> None:
    model = {"unet": naming_sdxl_unet(), "te1": tiny_clip_text(), "te2": tiny_clip_text_with_projection()}
    net = lc.create_network(model, preset="full", algo="lora", dim=2)
    layout = UNetLayout.from_config(model["unet"].config)
    ids = {role: _paths(c) for role, c in model.items()}
    roles: dict[str, int] = {}
    for m in net:
        kp = parse_key(m.key)
        real = ids[kp.role][id(m.base)]
        roles[kp.role] = roles.get(kp.role, 0) + 1
        if kp.role == "unet":
            assert kp.naming == "ldm"
            assert to_diffusers_path(kp, layout) == real
            assert to_diffusers_path(kp, "sdxl") == real
            assert kp.path == diffusers_to_ldm(real, layout)
            diff = with_naming(kp, "diffusers", "sdxl")
            assert diff.naming == "diffusers"
            assert diff.path == real
            assert parse_key(diff.key) == diff
            assert with_naming(diff, "ldm", "sdxl") == kp
        else:
            assert kp.path == _file_te_path(model[kp.role], real)
            assert kp.component == ("text_encoder_2" if kp.role == "te2" else "text_encoder")
    assert roles["te1"] == 12
    assert roles["te2"] == 12
    assert roles["unet"] > 100


def _sd15_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)


def _sdxl_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(
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


def _param_modules(component: torch.nn.Module) -> list[str]:
    """Every module that owns parameters directly (the layers any adapter can target)."""
    return [n for n, m in component.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


@pytest.mark.parametrize(("family", "build", "n_keys"), [("sd1", _sd15_unet, 686), ("sdxl", _sdxl_unet, 1680)])
def test_full_size_unet_every_layer_parses_uniquely(family: str, build: object, n_keys: int) -> None:
    unet = build()  # type: ignore[operator]
    layout = UNetLayout.from_config(unet.config)
    assert layout == UNetLayout.for_family(family)
    paths = _param_modules(unet)
    for path in paths:
        for prefix in ("lora_unet", "lycoris"):
            kp = parse_key(format_key("unet", path, prefix))
            assert (kp.path, kp.naming, kp.prefix) == (path, "diffusers", prefix)
        ldm = diffusers_to_ldm(path, layout)
        kp = parse_key(format_key("unet", ldm))
        assert (kp.path, kp.naming) == (ldm, "ldm")
        assert to_diffusers_path(kp, family) == path
        assert parse_path(path) == "diffusers"
        assert parse_path(ldm) == "ldm"
    # the real architectures (state-dict key counts from spec §1.2), and every state-dict key's module was covered
    state = unet.state_dict()
    assert len(state) == n_keys
    assert {k.rsplit(".", 1)[0] for k in state} == set(paths)


@pytest.mark.parametrize("preset", ["attn-mlp", "full"])
def test_full_size_network_keys_parse_to_real_modules(preset: str) -> None:
    with torch.device("meta"):
        te_cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        g_cfg = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, projection_dim=1280)
        models = {
            "sd1": {"unet": _sd15_unet(), "te": CLIPTextModel(te_cfg)},
            "sdxl": {"unet": _sdxl_unet(), "te1": CLIPTextModel(te_cfg), "te2": CLIPTextModelWithProjection(g_cfg)},
        }
    for family, model in models.items():
        net = lc.create_network(model, preset=preset, algo="lora", dim=1)
        names = {role: {n for n, _ in c.named_modules()} for role, c in model.items()}
        keys = [m.key for m in net]
        assert len(set(keys)) == len(keys)
        for key in keys:
            kp = parse_key(key)
            path = to_diffusers_path(kp, family)
            if kp.role != "unet":
                flat = not hasattr(model[kp.role], "text_model")
                path = path.removeprefix("text_model.") if flat else path
            assert path in names[kp.role], key
            assert kp.naming == ("ldm" if family == "sdxl" and kp.role == "unet" else
                                 "diffusers" if kp.role == "unet" else "clip")


def test_clip_paths_with_and_without_text_model() -> None:
    for te in (tiny_clip_text(), tiny_clip_text_with_projection()):
        for path in _param_modules(te):
            for written in {path, _file_te_path(te, path)}:
                for role in ("te", "te1", "te2"):
                    kp = parse_key(format_key(role, written))
                    assert kp == KeyPath(role, kpm.ROLE_PREFIX[role], written, "clip")  # type: ignore[arg-type]


def test_known_examples() -> None:
    assert parse_key("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj").path == (
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj")
    ldm = KeyPath("unet", "lora_unet", "output_blocks.2.2.conv", "ldm")
    assert parse_key("lora_unet_output_blocks_2_2_conv") == ldm
    assert parse_key("oft_unet_input_blocks_4_1_proj_in").role == "unet"
    kp = parse_key("lora_unet_input_blocks_4_1_proj_in")
    assert to_diffusers_path(kp, "sd1") == to_diffusers_path(kp, "sdxl") == "down_blocks.1.attentions.0.proj_in"
    assert to_diffusers_path(parse_key("lora_unet_input_blocks_1_1_proj_in"), "sd1") == (
        "down_blocks.0.attentions.0.proj_in")
    assert to_diffusers_path(parse_key("lora_unet_output_blocks_11_1_proj_in"), "sd1") == (
        "up_blocks.3.attentions.2.proj_in")
    te = parse_key("lora_te_text_model_encoder_layers_11_self_attn_out_proj")
    assert te == KeyPath("te", "lora_te", "text_model.encoder.layers.11.self_attn.out_proj", "clip")
    assert to_diffusers_path(te, "sd1") == to_ldm_path(te, "sd1") == te.path


@pytest.mark.parametrize("key", [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_x",  # unknown word
    "lora_unet_text_model_encoder_layers_0_mlp_fc1",  # TE path under a UNet prefix
    "lora_te_down_blocks_0_resnets_0_conv1",  # UNet path under a TE prefix
    "lora_unet_down_blocks_x_resnets_0_conv1",  # non-integer index
    "lora_unet_",
    "lora_foo_down_blocks_0_resnets_0_conv1",  # unknown prefix
    "lora_unet_down_blocks_0_resnets_0_conv1.lora_up",  # a tensor name, not a module key
])
def test_bad_keys_raise_naming_the_key(key: str) -> None:
    with pytest.raises(UnknownFormatError, match="module key") as info:
        parse_key(key)
    assert repr(key) in str(info.value)
    assert "\n" not in str(info.value)


def test_ambiguous_segmentation_is_detected() -> None:
    """The DP finds both parses when a grammar allows two (the real grammars are built to avoid this)."""
    leaf: kpm.Grammar = {}
    root = kpm._compile({"proj_out": leaf, "proj": {"out": leaf}})
    parses = kpm._parses(("proj", "out"), 0, root, {})
    assert sorted(".".join(p) for p in parses) == ["proj.out", "proj_out"]
    with pytest.raises(UnknownFormatError, match=r"module key 'x': ambiguous .*'proj.out'"):
        kpm._parse_underscored("proj_out", ("diffusers",), "module key 'x'", (("diffusers", root),))


def test_unet_naming_errors() -> None:
    kp = parse_key("lora_unet_input_blocks_1_1_proj_in")  # SD1: attention at level 0; SDXL: none there
    with pytest.raises(UnknownFormatError):
        to_diffusers_path(kp, "sdxl")
    with pytest.raises(UnknownFormatError):
        parse_path("down_blocks.0.foo")
