"""diffusers ↔ LDM UNet naming, checked against diffusers' own LDM checkpoint converter on tiny real UNets."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_sd import naming_sd1_unet, naming_sdxl_unet

from lyco_core.errors import InvalidConfigError, UnknownFormatError
from lyco_core.formats.unet_naming import UNetLayout, diffusers_to_ldm, ldm_to_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

LDM_PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def unet_and_family(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    unet = naming_sd1_unet() if request.param == "sd1" else naming_sdxl_unet()
    return unet, request.param


def test_layout_from_config_matches_family(unet_and_family: tuple[torch.nn.Module, str]) -> None:
    unet, family = unet_and_family
    layout = UNetLayout.from_config(unet.config)
    assert layout == UNetLayout.for_family(family)
    assert layout.levels == (4 if family == "sd1" else 3)
    assert UNetLayout.for_family("sd2") == UNetLayout.for_family("sd1")


def test_state_dict_round_trip_through_diffusers_converter(unet_and_family: tuple[torch.nn.Module, str]) -> None:
    """Every diffusers key → our LDM key → diffusers' convert_ldm_unet_checkpoint gives the state dict back."""
    unet, _family = unet_and_family
    layout = UNetLayout.from_config(unet.config)
    original = unet.state_dict()
    ldm = {LDM_PREFIX + diffusers_to_ldm(key, layout): tensor for key, tensor in original.items()}
    assert len(ldm) == len(original)  # injective
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key] is tensor or torch.equal(back[key], tensor), key
    # and our own inverse agrees with diffusers' converter key for key
    for key in original:
        assert ldm_to_diffusers(diffusers_to_ldm(key, layout), layout) == key


# Modules with no single LDM counterpart: containers, the resnet SiLU (two LDM slots), the sinusoidal projections.
_UNMAPPED = re.compile(
    r"(?:down_blocks|up_blocks)(?:\.\d+(?:\.(?:resnets|attentions|downsamplers|upsamplers))?)?"
    r"|mid_block(?:\.(?:resnets|attentions))?"
    r"|time_proj|add_time_proj"
    r"|.*\.nonlinearity"
)


def test_round_trip_over_every_module_path(unet_and_family: tuple[torch.nn.Module, str]) -> None:
    unet, _family = unet_and_family
    layout = UNetLayout.from_config(unet.config)
    mapped: dict[str, str] = {}
    for path, module in unet.named_modules():
        if _UNMAPPED.fullmatch(path):
            assert not list(module.parameters(recurse=False)), path
            with pytest.raises(UnknownFormatError, match=re.escape(repr(path))):
                diffusers_to_ldm(path, layout)
            continue
        ldm = diffusers_to_ldm(path, layout)
        assert ldm_to_diffusers(ldm, layout) == path
        mapped[path] = ldm
    assert len(set(mapped.values())) == len(mapped)
    with_params = {p for p, m in unet.named_modules() if list(m.parameters(recurse=False))}
    assert with_params <= set(mapped)


_T9 = ".transformer_blocks.9."


@pytest.mark.parametrize(
    ("family", "diffusers_path", "ldm_path"),
    [
        ("sd1", "down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
        ("sdxl", "down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
        ("sd1", "down_blocks.0.attentions.0", "input_blocks.1.1"),
        ("sd1", "up_blocks.3.attentions.2", "output_blocks.11.1"),
        ("sd1", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        ("sd1", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("sd1", "up_blocks.2.upsamplers.0.conv", "output_blocks.8.2.conv"),
        ("sdxl", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("sdxl", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("sdxl", "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("sdxl", "down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        ("sdxl", "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q", "input_blocks.8.1" + _T9 + "attn1.to_q"),
        ("sdxl", "mid_block.attentions.0.transformer_blocks.9.ff.net.2", "middle_block.1" + _T9 + "ff.net.2"),
        ("sdxl", "add_embedding.linear_2", "label_emb.0.2"),
        ("sd1", "conv_in", "input_blocks.0.0"),
        ("sd1", "time_embedding.linear_1", "time_embed.0"),
        ("sd1", "conv_norm_out", "out.0"),
        ("sd1", "conv_out", "out.2"),
        ("sd1", "mid_block.resnets.0.conv1", "middle_block.0.in_layers.2"),
        ("sd1", "mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        ("sd1", "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("sd1", "up_blocks.3.resnets.2.norm2", "output_blocks.11.0.out_layers.0"),
        ("sd1", "up_blocks.0.resnets.1.conv2.weight", "output_blocks.1.0.out_layers.3.weight"),
        ("sd1", "down_blocks.3.resnets.1.norm1.bias", "input_blocks.11.0.in_layers.0.bias"),
        ("sd1", "", ""),
    ],
)
def test_spec_examples(family: str, diffusers_path: str, ldm_path: str) -> None:
    layout = UNetLayout.for_family(family)
    assert diffusers_to_ldm(diffusers_path, layout) == ldm_path
    assert ldm_to_diffusers(ldm_path, layout) == diffusers_path


@pytest.mark.parametrize(
    ("family", "path"),
    [
        ("sd1", "down_blocks.4.resnets.0"),  # no level 4
        ("sd1", "down_blocks.3.attentions.0"),  # SD1 down 3 has no attention
        ("sd1", "down_blocks.0.resnets.2"),  # L = 2
        ("sd1", "down_blocks.3.downsamplers.0.conv"),  # last level has no downsampler
        ("sd1", "up_blocks.3.upsamplers.0.conv"),
        ("sd1", "down_blocks.0.resnets.0.nonlinearity"),
        ("sd1", "down_blocks.0.resnets.0.conv9"),
        ("sd1", "mid_block.resnets.2"),
        ("sdxl", "down_blocks.0.attentions.0.proj_in"),  # SDXL down 0 has no attention
        ("sdxl", "up_blocks.2.attentions.0"),
        ("sd1", "down_blocks.0"),
        ("sd1", "down_blocks.0.attentions.0.conv"),  # not a transformer-block child
        ("sd1", "time_proj"),
        ("sd1", "unknown_module.weight"),
    ],
)
def test_unmappable_diffusers_paths_raise(family: str, path: str) -> None:
    with pytest.raises(UnknownFormatError, match=re.escape(repr(path))):
        diffusers_to_ldm(path, UNetLayout.for_family(family))


@pytest.mark.parametrize(
    ("family", "path"),
    [
        ("sd1", "input_blocks.12.0"),  # past the last level
        ("sd1", "input_blocks.3.1"),  # downsampler position has no attention
        ("sd1", "input_blocks.3.0.conv"),  # the downsampler conv is "op"
        ("sd1", "input_blocks.10.1"),  # down 3 has no attention
        ("sd1", "output_blocks.2.2.conv"),  # SD1 up 0 has no attention: upsampler is at .1
        ("sd1", "output_blocks.1.1.conv"),  # not the upsampler position
        ("sd1", "output_blocks.12.0"),
        ("sd1", "output_blocks.11.2.conv"),  # last level has no upsampler
        ("sdxl", "output_blocks.2.1.conv"),  # SDXL up 0 has attention: upsampler is at .2
        ("sd1", "middle_block.3"),
        ("sd1", "input_blocks.01.0"),  # non-canonical index
        ("sd1", "input_blocks.1"),  # container
        ("sd1", "input_blocks.1.0.in_layers"),  # container
        ("sd1", "label_emb"),
        ("sd1", "middle_block.1.op"),
    ],
)
def test_unmappable_ldm_paths_raise(family: str, path: str) -> None:
    with pytest.raises(UnknownFormatError, match=re.escape(repr(path))):
        ldm_to_diffusers(path, UNetLayout.for_family(family))


def test_layout_validation() -> None:
    with pytest.raises(InvalidConfigError, match="sd3"):
        UNetLayout.for_family("sd3")
    with pytest.raises(InvalidConfigError):
        UNetLayout(2, (True, False), (False,))
    with pytest.raises(UnknownFormatError, match="SimpleCrossAttnDownBlock2D"):
        UNetLayout.from_config(
            {
                "layers_per_block": 2,
                "down_block_types": ["SimpleCrossAttnDownBlock2D"],
                "up_block_types": ["UpBlock2D"],
            }
        )
    uniform = UNetLayout.from_config(
        {"layers_per_block": [1, 1], "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
    )
    assert uniform.layers_per_block == 1
    assert diffusers_to_ldm("down_blocks.1.resnets.0", uniform) == "input_blocks.3.0"
    assert diffusers_to_ldm("down_blocks.0.downsamplers.0", uniform) == "input_blocks.2.0"
    with pytest.raises(UnknownFormatError, match="per-block"):
        UNetLayout.from_config(
            {"layers_per_block": [1, 2], "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
        )
