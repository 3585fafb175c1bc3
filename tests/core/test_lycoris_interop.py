"""Whole-network interop with lycoris-lora 4.1.3 (`lycoris.kohya`, what sd-scripts uses), both directions.

Model: a tiny SD 1.x-layout UNet and a CLIP text encoder built from configs. Every algorithm and
variant is trained-like (random parameters), saved by one library and loaded by the other; the UNet output
(conditioned on the text encoder's output) must agree. LyCORIS's *forward* is the reference (its LoHa/LoKr
merge applies α/r twice). Variants LyCORIS cannot reload itself are checked in one direction and the
other direction is marked as LyCORIS's failure (strict xfail, so a fixed LyCORIS turns it into a pass).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from checks import rel_err
from lycoris.kohya import LycorisNetworkKohya, create_network, create_network_from_weights
from lycoris.utils.preset import read_preset
from tiny_sd import tiny_clip_text_with_projection, tiny_sd1_unet

import lyco_core as lc

LYCORIS_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
"""
LYCO_PRESET: dict[str, Any] = {
    "unet": {"target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
             "target_name": ["conv_in", "conv_out"]},
    "text_encoder": {"target_module": ["CLIPAttention", "CLIPMLP"]},
}

# name: (LyCORIS network args, Lyco options, LyCORIS can reload the file it wrote / a Lyco file)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], bool]] = {
    "lora": ({"algo": "lora"}, {"algo": "lora"}, True),
    "lora-tucker": ({"algo": "lora", "use_tucker": True}, {"algo": "lora", "use_tucker": True}, True),
    "lora-rs": ({"algo": "lora", "rs_lora": True}, {"algo": "lora", "rs_lora": True}, True),
    "lora-dora": ({"algo": "lora", "dora_wd": True}, {"algo": "lora", "dora": True}, True),
    "lora-dora-input": ({"algo": "lora", "dora_wd": True, "wd_on_output": False},
                        {"algo": "lora", "dora": True, "dora_on_output": False}, False),
    "loha": ({"algo": "loha"}, {"algo": "loha"}, True),
    "loha-tucker": ({"algo": "loha", "use_tucker": True}, {"algo": "loha", "use_tucker": True}, True),
    "loha-dora": ({"algo": "loha", "dora_wd": True}, {"algo": "loha", "dora": True}, True),
    "lokr": ({"algo": "lokr"}, {"algo": "lokr"}, True),
    "lokr-factor4": ({"algo": "lokr", "factor": 4}, {"algo": "lokr", "factor": 4}, True),
    "lokr-full": ({"algo": "lokr", "factor": 4, "dim": 100000}, {"algo": "lokr", "factor": 4, "dim": 100000}, True),
    "lokr-decompose-both": ({"algo": "lokr", "factor": 4, "decompose_both": True, "dim": 2},
                            {"algo": "lokr", "factor": 4, "decompose_both": True, "dim": 2}, True),
    "lokr-tucker": ({"algo": "lokr", "use_tucker": True, "dim": 2}, {"algo": "lokr", "use_tucker": True, "dim": 2},
                    False),
    "lokr-dora": ({"algo": "lokr", "dora_wd": True}, {"algo": "lokr", "dora": True}, True),
    "ia3": ({"algo": "ia3"}, {"algo": "ia3"}, False),
    "glora": ({"algo": "glora"}, {"algo": "glora"}, True),
    "full": ({"algo": "full"}, {"algo": "full"}, True),
    "diag-oft": ({"algo": "diag-oft"}, {"algo": "diag-oft"}, True),
    "diag-oft-constrained": ({"algo": "diag-oft", "constraint": 1e-3, "rescaled": True},
                             {"algo": "diag-oft", "constraint": 1e-3, "rescaled": True}, True),
    "boft": ({"algo": "boft"}, {"algo": "boft"}, True),
    "lora-norm": ({"algo": "lora", "train_norm": True}, {"algo": "lora"}, True),
}


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny_sd1_unet(cross_attention_dim=16), tiny_clip_text_with_projection()


def _run(unet: torch.nn.Module, te: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, 100, (2, 7), generator=g)
    with torch.no_grad():
        cond = te(tokens).last_hidden_state
        return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 50]), encoder_hidden_states=cond).sample


def _randomise(params: Any) -> None:
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.copy_(torch.randn_like(p) * 0.05 + (p if p.ndim and p.abs().mean() > 0.5 else 0))


def _lyco_opts(opts: dict[str, Any]) -> dict[str, Any]:
    out = {"dim": 4, "alpha": 1.0, **opts}
    return out


@pytest.fixture
def lycoris_preset(tmp_path: Path) -> str:
    p = tmp_path / "preset.toml"
    p.write_text(LYCORIS_PRESET)
    return str(p)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lycoris_file_loads_in_lyco(variant: str, tmp_path: Path, lycoris_preset: str) -> None:
    args, _opts, _ = VARIANTS[variant]
    args = dict(args)
    dim = args.pop("dim", 4)
    unet, te = _models()
    torch.manual_seed(1)
    net = create_network(1.0, dim, 1, None, te, unet, preset=lycoris_preset, **args)
    net.apply_to(te, unet, True, True)
    _randomise(net.parameters())
    expected = _run(unet, te)
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, {})

    unet2, te2 = _models()
    base = _run(unet2, te2)
    lyco, report = lc.load_network(path, {"unet": unet2, "te": te2})
    assert report.complete
    assert len(lyco) == len(net.unet_loras) + len(net.text_encoder_loras)
    lyco.apply()
    got = _run(unet2, te2)
    assert rel_err(got, expected) < 1e-5, "forward differs"
    assert rel_err(expected, base) > 1e-4, "the adapter must change the output for this test to mean anything"
    lyco.restore()
    lyco.merge()
    assert rel_err(_run(unet2, te2), expected) < 1e-5, "merged weights differ"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lyco_file_loads_in_lycoris(
    variant: str, tmp_path: Path, lycoris_preset: str, request: pytest.FixtureRequest
) -> None:
    _, opts, reloadable = VARIANTS[variant]
    if not reloadable:
        request.applymarker(pytest.mark.xfail(reason="LyCORIS 4.1.3 cannot rebuild this module kind from a file "
                                               "(lycoris-algorithms spec §2.14 #2)", strict=True))
    unet, te = _models()
    preset = dict(LYCO_PRESET, train_norm=variant == "lora-norm")
    net = lc.create_network({"unet": unet, "te": te}, preset=preset, **_lyco_opts(opts))
    _randomise(net.parameters())
    net.apply()
    expected = _run(unet, te)
    path = tmp_path / "lyco.safetensors"
    net.save(path)

    unet2, te2 = _models()
    # LyCORIS keeps presets on the class; its default 'full' preset breaks on diffusers UNets (spec §2.14 #3)
    LycorisNetworkKohya.apply_preset(read_preset(lycoris_preset))
    ref, _ = create_network_from_weights(1.0, str(path), None, te2, unet2, for_inference=True)
    assert len(ref.unet_loras) + len(ref.text_encoder_loras) == len(net)
    ref.apply_to(te2, unet2, True, True)
    assert rel_err(_run(unet2, te2), expected) < 1e-5
