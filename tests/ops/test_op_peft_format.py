"""diffusers- and PEFT-style LoRA files (lyco_core.formats.peft) checked against the real consumers.

Each file Lyco writes is loaded by diffusers 0.42 (``lora_state_dict`` + ``load_lora_into_unet`` /
``load_lora_into_text_encoder``) or PEFT (``inject_adapter_in_model`` + ``set_peft_model_state_dict``,
``PeftModel.from_pretrained``), fused by PEFT, and every fused weight is compared to ``ModuleTensors.merge``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_files import PRESET, base_weights, models, randomise
from checks import rel_err
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_sd import tiny_clip_text, tiny_clip_text_with_projection, tiny_sdxl_unet, unet_inputs

import lyco_core as lc
from lyco_core.errors import FileExistsLycoError, UnknownFormatError
from lyco_core.files import ModuleTensors, read_adapter
from lyco_core.formats.key_paths import format_key, parse_key, with_naming
from lyco_core.formats.peft import LORA_METADATA_KEY, read_peft_style, write_peft_style
from lyco_core.formats.unet_naming import UNetLayout, diffusers_to_ldm


def _vary(modules: dict[str, ModuleTensors]) -> dict[str, ModuleTensors]:
    """Per-module alphas and ranks that differ (so diffusers needs alpha_pattern and rank_pattern)."""
    out = {}
    for i, (key, m) in enumerate(sorted(modules.items())):
        t = dict(m.tensors)
        if i % 4 == 1:  # rank 4 → 2
            t["lora_down.weight"] = t["lora_down.weight"][:2].clone()
            t["lora_up.weight"] = t["lora_up.weight"][:, :2].clone()
        t["alpha"] = torch.tensor([2.0, 0.5, 3.0, 1.25, 2.0][i % 5])
        out[key] = ModuleTensors(key, m.algorithm, t)
    return out


def _adapter(tmp_path: Path, model: dict[str, torch.nn.Module], preset: object, seed: int = 3,
             **opts: object) -> dict[str, ModuleTensors]:
    net = lc.create_network(model, preset=preset, algo="lora", dim=4, alpha=2.0, **opts)
    randomise(net, seed, scale=0.2)
    path = tmp_path / f"src-{seed}.safetensors"
    net.save(path)
    return read_adapter(path).modules


def _fused(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Merge every PEFT LoRA layer into its base layer; module path → fused weight."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
            out[name] = m.get_base_layer().weight.detach().clone()
    return out


def _check_fused(fused: dict[str, torch.Tensor], modules: dict[str, ModuleTensors],
                 bases: dict[str, tuple[torch.Tensor, torch.Tensor | None]], key_of: dict[str, str]) -> None:
    assert sorted(key_of[n] for n in fused) == sorted(modules)
    for name, w in fused.items():
        key = key_of[name]
        expected, _ = modules[key].merge(bases[key][0].float())
        assert (w - bases[key][0]).abs().max() > 0  # the adapter really changed the layer
        assert rel_err(w, expected) <= 1e-5, key


def _sd1_key_of(model: dict[str, torch.nn.Module]) -> dict[str, str]:
    out = {n: format_key("unet", n) for n, _ in model["unet"].named_modules() if n}
    te_flat = not hasattr(model["te"], "text_model")
    out |= {f"te:{n}": format_key("te", ("text_model." + n) if te_flat else n) for n, _ in model["te"].named_modules()
            if n}
    return out


def _load_diffusers_sd1(file: Path, model: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    sd, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(file), return_lora_metadata=True)
    assert alphas is None
    assert metadata is not None
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(sd, alphas, model["unet"], metadata=metadata)
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(sd, alphas, model["te"], metadata=metadata)
    return _fused(model["unet"]) | {f"te:{n}": w for n, w in _fused(model["te"]).items()}


@pytest.mark.parametrize("preset", ["attn-mlp", "locon"])
def test_diffusers_style_loads_in_diffusers_and_fuses_to_our_merge(tmp_path: Path, preset: str) -> None:
    modules = _vary(_adapter(tmp_path, models(), PRESET if preset == "locon" else preset))
    if preset == "locon":
        assert any(m.tensors["lora_down.weight"].shape[-1] == 3 for m in modules.values())  # 3×3 convs present
    out = write_peft_style(modules, tmp_path / "d.safetensors", style="diffusers", family="sd1")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "pt"
    flat = json.loads(meta[LORA_METADATA_KEY])
    assert flat["unet.alpha_pattern"]
    assert flat["unet.rank_pattern"]
    assert flat["text_encoder.alpha_pattern"]
    assert all(k.startswith(("unet.", "text_encoder.text_model.")) for k in keys)
    model = models()
    fused = _load_diffusers_sd1(out, model)
    _check_fused(fused, modules, base_weights(), _sd1_key_of(model))


def test_diffusers_style_sdxl_ldm_keys(tmp_path: Path) -> None:
    """SDXL kohya files use LDM UNet names; the diffusers file must use diffusers paths (+ text_encoder_2)."""
    model = {"unet": tiny_sdxl_unet(), "te1": tiny_clip_text(), "te2": tiny_clip_text_with_projection()}
    modules = _vary(_adapter(tmp_path, model, PRESET))
    assert any(k.startswith("lora_unet_input_blocks_") for k in modules)
    layout = UNetLayout.from_config(model["unet"].config)
    out = write_peft_style(modules, tmp_path / "xl.safetensors", style="diffusers", family="sdxl")
    sd, alphas, metadata = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(out), return_lora_metadata=True)
    fresh = {"unet": tiny_sdxl_unet(), "te1": tiny_clip_text(), "te2": tiny_clip_text_with_projection()}
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(sd, alphas, fresh["unet"], metadata=metadata)
    for role, prefix in (("te1", "text_encoder"), ("te2", "text_encoder_2")):
        StableDiffusionXLLoraLoaderMixin.load_lora_into_text_encoder(
            sd, alphas, fresh[role], prefix=prefix, metadata=metadata)
    fused = {f"unet:{n}": w for n, w in _fused(fresh["unet"]).items()}
    key_of = {f"unet:{n}": format_key("unet", diffusers_to_ldm(n, layout)) for n, _ in fresh["unet"].named_modules()
              if n and n in {k.split(":", 1)[1] for k in fused}}
    for role in ("te1", "te2"):
        f = _fused(fresh[role])
        fused |= {f"{role}:{n}": w for n, w in f.items()}
        key_of |= {f"{role}:{n}": format_key(role, n if n.startswith("text_model.") else "text_model." + n) for n in f}
    bases = {m.key: (m.base.weight.detach().clone(), None)
             for m in lc.create_network({"unet": tiny_sdxl_unet(), "te1": tiny_clip_text(),
                                         "te2": tiny_clip_text_with_projection()}, preset=PRESET, algo="full")}
    _check_fused(fused, modules, bases, key_of)
    back, _ = read_peft_style(out)  # family guessed from text_encoder_2 → LDM names again
    assert sorted(back) == sorted(modules)


def test_dora_output_axis_loads_as_peft_dora(tmp_path: Path) -> None:
    modules = _adapter(tmp_path, models(), "attn-mlp", dora=True)
    assert all(m.tensors["dora_scale"].shape[1] == 1 for m in modules.values())
    out = write_peft_style(modules, tmp_path / "dora.safetensors", style="diffusers", family="sd1")
    assert json.loads(load_meta(out)[LORA_METADATA_KEY])["unet.use_dora"] is True
    model = models()
    _check_fused(_load_diffusers_sd1(out, model), modules, base_weights(), _sd1_key_of(model))
    back, _ = read_peft_style(out)
    bases = base_weights()
    for key, m in modules.items():
        w = bases[key][0]
        assert rel_err(back[key].merge(w)[0], m.merge(w)[0]) <= 1e-6


def load_meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


@pytest.mark.parametrize("dora", [False, True])
def test_peft_style_forward_equals_lyco(tmp_path: Path, dora: bool) -> None:
    src_model = models()
    net = lc.create_network(src_model, preset=PRESET, algo="lora", dim=4, alpha=2.0, dora=dora)
    randomise(net, 5, scale=0.2)
    net.save(tmp_path / "k.safetensors")
    modules = _vary(read_adapter(tmp_path / "k.safetensors").modules)
    out = write_peft_style(modules, tmp_path / "peft", style="peft", family="sd1")
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "unet"]

    # reference: Lyco's own network with the varied modules, applied to a fresh model
    ref_model = models()
    tensors = {f"{k}.{n}": t for k, m in modules.items() for n, t in m.tensors.items()}
    lyco_net, _ = lc.network_from_tensors(tensors, ref_model)
    lyco_net.apply()
    inputs = unet_inputs(ref_model["unet"])
    ids = torch.tensor([[0, 5, 7, 9, 1]])
    with torch.no_grad():
        ref_unet = ref_model["unet"](**inputs).sample
        ref_te = ref_model["te"](ids).last_hidden_state

    peft_model = models()
    cfg = json.loads((out / "unet" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    kwargs = {k: v for k, v in cfg.items() if k not in ("peft_type",)}
    unet = inject_adapter_in_model(LoraConfig(**kwargs), peft_model["unet"])
    result = set_peft_model_state_dict(unet, load_file(out / "unet" / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    te = PeftModel.from_pretrained(peft_model["te"], out / "text_encoder")
    with torch.no_grad():
        got_unet = unet(**inputs).sample
        got_te = te(input_ids=ids).last_hidden_state
        plain = models()["unet"](**inputs).sample
    assert rel_err(ref_unet, plain) > 1e-3  # the adapter changes the output
    assert rel_err(got_unet - plain, ref_unet - plain) <= 1e-4  # the adapter's effect, compared relatively
    assert rel_err(got_unet, ref_unet) <= 1e-5
    assert rel_err(got_te, ref_te) <= 1e-5

    back, _ = read_peft_style(out)
    assert sorted(back) == sorted(modules)
    bases = base_weights()
    for key, m in modules.items():
        w = bases[key][0]
        assert torch.allclose(back[key].delta_weight(w), m.delta_weight(w), rtol=0, atol=1e-6)


def test_round_trip_kohya_diffusers_kohya(tmp_path: Path) -> None:
    modules = _vary(_adapter(tmp_path, models(), PRESET))
    out = write_peft_style(modules, tmp_path / "d.safetensors", style="diffusers", family="sd1")
    back, meta = read_peft_style(out)
    assert meta["format"] == "pt"
    assert sorted(back) == sorted(modules)
    bases = base_weights()
    for key, m in modules.items():
        assert back[key].algorithm.name == "lora"
        assert float(back[key].tensors["alpha"]) == pytest.approx(float(m.tensors["alpha"]))
        assert torch.equal(back[key].delta_weight(bases[key][0]), m.delta_weight(bases[key][0]))
    ldm, _ = read_peft_style(out, naming="ldm")
    assert sorted(ldm) == sorted(with_naming(parse_key(k), "ldm", "sd1").key for k in modules)
    assert any(k.startswith("lora_unet_input_blocks_") for k in ldm)


def test_old_diffusers_key_styles_read(tmp_path: Path) -> None:
    """Attention-processor (≤0.20) and "new" (lora.down / lora_linear_layer) keys read as the same LoRA."""
    modules = _adapter(tmp_path, models(), "attn-mlp")
    out = write_peft_style(modules, tmp_path / "d.safetensors", style="diffusers", family="sd1")
    sd = load_file(out)
    old, new = {}, {}
    for k, v in sd.items():
        ab = "down" if ".lora_A." in k else "up"
        o = k
        for attn in ("to_q", "to_k", "to_v"):
            o = o.replace(f".{attn}.lora_{'A' if ab == 'down' else 'B'}.weight", f".processor.{attn}_lora.{ab}.weight")
        o = o.replace(f".to_out.0.lora_{'A' if ab == 'down' else 'B'}.weight", f".processor.to_out_lora.{ab}.weight")
        for proj, name in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("out_proj", "to_out")):
            o = o.replace(f"self_attn.{proj}.lora_{'A' if ab == 'down' else 'B'}.weight",
                          f"self_attn.{name}_lora.{ab}.weight")
        old[o] = v
        n = k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        if k.startswith("text_encoder."):
            n = n.replace(".lora.", ".lora_linear_layer.")
        new[n] = v
    assert any(".processor.to_out_lora.down" in k for k in old)
    assert any("self_attn.to_q_lora.up" in k for k in old)
    bases = base_weights()
    for name, sd2 in (("old", old), ("new", new)):
        f = tmp_path / f"{name}.safetensors"
        save_file(sd2, str(f))
        back, _ = read_peft_style(f)
        assert sorted(back) == sorted(modules), name
        for key, m in modules.items():  # no alpha in these files: alpha = r (scale 1), as diffusers assumes
            w = bases[key][0]
            expected = m.delta_weight(w) / m.algorithm.scale(m.tensors)
            assert torch.allclose(back[key].delta_weight(w), expected, rtol=1e-5, atol=1e-7), (name, key)


def test_unrepresentable_modules_raise(tmp_path: Path) -> None:
    tucker = _adapter(tmp_path, models(), PRESET, use_tucker=True)
    with pytest.raises(UnknownFormatError, match=r"lora_unet_.*Tucker"):
        write_peft_style(tucker, tmp_path / "t.safetensors", style="diffusers", family="sd1")
    dora_in = _adapter(tmp_path, models(), "attn-mlp", dora=True, dora_on_output=False, seed=4)
    with pytest.raises(UnknownFormatError, match="per input channel"):
        write_peft_style(dora_in, tmp_path / "di.safetensors", style="peft", family="sd1")
    loha = lc.create_network(models(), preset="attn-mlp", algo="loha", dim=4)
    loha.save(tmp_path / "loha.safetensors")
    with pytest.raises(UnknownFormatError, match="'loha'"):
        write_peft_style(read_adapter(tmp_path / "loha.safetensors").modules, tmp_path / "l.safetensors",
                         style="diffusers", family="sd1")
    assert not [p for p in ("t.safetensors", "di.safetensors", "l.safetensors") if (tmp_path / p).exists()]


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    modules = _adapter(tmp_path, models(), "attn-mlp")
    out = write_peft_style(modules, tmp_path / "d.safetensors", style="diffusers", family="sd1")
    before = out.read_bytes()
    with pytest.raises(FileExistsLycoError):
        write_peft_style(modules, out, style="diffusers", family="sd1")
    assert out.read_bytes() == before
    write_peft_style(modules, out, style="diffusers", family="sd1", dtype=torch.float16, overwrite=True)
    assert all(t.dtype == torch.float16 for t in load_file(out).values())
    d = write_peft_style(modules, tmp_path / "p", style="peft", family="sd1")
    with pytest.raises(FileExistsLycoError):
        write_peft_style(modules, d, style="peft", family="sd1")


def test_bad_tensor_names_raise(tmp_path: Path) -> None:
    f = tmp_path / "bad.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 16),
               "unet.down_blocks.0.attentions.0.proj_in.something": torch.zeros(2)}, str(f))
    with pytest.raises(UnknownFormatError, match=r"proj_in\.something"):
        read_peft_style(f)
    save_file({"unet.down_blocks.0.nonsense.lora_A.weight": torch.zeros(2, 16),
               "unet.down_blocks.0.nonsense.lora_B.weight": torch.zeros(16, 2)}, str(f))
    with pytest.raises(UnknownFormatError, match="nonsense"):
        read_peft_style(f)
