"""SDXL: Lyco writes sd-scripts' LDM UNet names and lora_te1/lora_te2; it reads those and diffusers-named files."""

from __future__ import annotations

from pathlib import Path

import torch
from lycoris.kohya import LycorisNetworkKohya, create_network
from lycoris.utils.preset import read_preset
from tiny_sd import tiny_clip_text, tiny_clip_text_with_projection, tiny_sdxl_unet, unet_inputs

import lyco_core as lc


def _models() -> dict[str, torch.nn.Module]:
    return {"unet": tiny_sdxl_unet(), "te1": tiny_clip_text(), "te2": tiny_clip_text_with_projection()}


def _run(models: dict[str, torch.nn.Module]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 100, (1, 6), generator=g)
    with torch.no_grad():
        h1 = models["te1"](tokens).last_hidden_state
        h2 = models["te2"](tokens).last_hidden_state
        inputs = unet_inputs(models["unet"])
        inputs["encoder_hidden_states"] = torch.cat([h1[..., :16], h2], dim=-1)
        return models["unet"](**inputs).sample


def test_lyco_sdxl_round_trip(tmp_path: Path) -> None:
    models = _models()
    net = lc.create_network(models, algo="lokr", factor=2, dim=4, preset="full")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    net.apply()
    expected = _run(models)
    path = tmp_path / "sdxl.safetensors"
    net.save(path, base_family="sdxl")
    keys = set(lc.read_adapter(path).modules)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    assert lc.read_adapter(path).header["ss_base_model_version"] == "sdxl_base_v1-0"

    fresh = _models()
    base = _run(fresh)
    net2, report = lc.load_network(path, fresh)
    assert report.complete
    net2.apply()
    torch.testing.assert_close(_run(fresh), expected)
    assert not torch.allclose(base, expected)


def test_lycoris_sdxl_file_with_diffusers_names_loads(tmp_path: Path) -> None:
    preset = tmp_path / "p.toml"
    preset.write_text('unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]\n'
                      'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n')
    models = _models()
    LycorisNetworkKohya.apply_preset(read_preset(str(preset)))
    ref = create_network(1.0, 4, 1, None, [models["te1"], models["te2"]], models["unet"], algo="loha",
                         preset=str(preset))
    ref.apply_to([models["te1"], models["te2"]], models["unet"], True, True)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    expected = _run(models)
    path = tmp_path / "lycoris_sdxl.safetensors"
    ref.save_weights(str(path), torch.float32, {})
    assert any(k.startswith("lora_unet_down_blocks_") for k in lc.read_adapter(path).modules)

    fresh = _models()
    net, report = lc.load_network(path, fresh)
    assert report.complete
    assert len(net) == len(ref.loras)
    net.apply()
    torch.testing.assert_close(_run(fresh), expected, rtol=1e-5, atol=1e-5)
