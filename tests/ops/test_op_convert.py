"""`lyco adapter convert`: namings, kohya/LyCORIS and ComfyUI output, algorithm changes, other base models.

Consumers are checked independently: LyCORIS loads the kohya output (same forward as Lyco with the original file),
and the ComfyUI merge formulas (comfy/weight_adapter/{lora,oft,boft,base}.py and the ``diff`` patch, as read and
written out below) applied to the comfy output give the weights Lyco merges from the original file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_files import PRESET, base_weights, make_adapter, models, randomise
from checkpoints import save_pipeline
from checks import rel_err
from diffusers import UNet2DConditionModel
from tiny_sd import tiny_clip_text_with_projection, tiny_sd1_unet, tiny_sdxl_unet, unet_inputs

import lyco_core as lc
from lyco_core.cli.adapter.convert import register
from lyco_core.errors import IncompatibleBaseError, InvalidConfigError, LycoError
from lyco_core.files import ModuleTensors, read_adapter
from lyco_core.formats.key_paths import parse_key
from lyco_core.ops.convert import bake_oft_constraint, convert_adapter, project_change

UNET_PRESET: dict[str, Any] = {"unet": PRESET["unet"]}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1 pipeline the adapter_files adapters are made for, as a diffusers folder."""
    m = models()
    return save_pipeline(tmp_path_factory.mktemp("base") / "sd1", m["unet"], m["te"])


@pytest.fixture(scope="module")
def weights() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return base_weights()


def _tensors_equal(a: ModuleTensors, b: ModuleTensors) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def _unet_out(unet: UNet2DConditionModel) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


# --------------------------------------------------------------------------------------------- namings
def _sdxl_file(path: Path) -> Path:
    net = lc.create_network({"unet": tiny_sdxl_unet()}, preset=UNET_PRESET, algo="lora", dim=4, alpha=2.0)
    randomise(net, 3)
    net.save(path, base_family="sdxl")
    return path


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_naming_round_trip_is_exact(family: str, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a.safetensors", "lokr") if family == "sd1" else _sdxl_file(tmp_path / "a.st")
    flip = "ldm" if family == "sd1" else "diffusers"
    back = "diffusers" if family == "sd1" else "ldm"
    convert_adapter(src, tmp_path / "flip.safetensors", to="kohya", naming=flip)
    flipped = read_adapter(tmp_path / "flip.safetensors")
    unet_keys = [k for k in flipped.modules if k.startswith("lora_unet_")]
    assert unet_keys
    assert all(parse_key(k).naming == flip for k in unet_keys)
    # the canonical naming of the family is the default
    report = convert_adapter(tmp_path / "flip.safetensors", tmp_path / "back.safetensors", to="kohya")
    original, again = read_adapter(src), read_adapter(tmp_path / "back.safetensors")
    assert all(parse_key(k).naming == back for k in again.modules if k.startswith("lora_unet_"))
    assert again.modules.keys() == original.modules.keys()
    assert all(_tensors_equal(again.modules[k], original.modules[k]) for k in original.modules)
    assert not report.dropped
    assert report.max_rel_error() is None


def test_sdxl_diffusers_naming_loads_in_lycoris(tmp_path: Path) -> None:
    """SDXL file (LDM keys, as sd-scripts writes) → --naming diffusers → LyCORIS on a diffusers SDXL UNet."""
    from lycoris.kohya import create_network_from_weights

    src = _sdxl_file(tmp_path / "a.safetensors")
    out = tmp_path / "diffusers-named.safetensors"
    convert_adapter(src, out, to="kohya", naming="diffusers")
    unet = tiny_sdxl_unet()
    base = _unet_out(unet)
    lyco, report = lc.load_network(src, {"unet": unet})
    assert report.complete
    lyco.apply()
    expected = _unet_out(unet)
    assert rel_err(expected, base) > 1e-4
    _lycoris_preset(tmp_path)
    unet2 = tiny_sdxl_unet()
    ref, _ = create_network_from_weights(1.0, str(out), None, tiny_clip_text_with_projection(), unet2,
                                         for_inference=True)
    assert len(ref.unet_loras) == len(read_adapter(src).modules)
    ref.apply_to(None, unet2, False, True)
    assert rel_err(_unet_out(unet2), expected) < 1e-5


LYCORIS_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
"""


def _lycoris_preset(tmp_path: Path) -> None:
    """LyCORIS keeps its preset on the class; its default 'full' preset breaks on diffusers UNets."""
    from lycoris.kohya import LycorisNetworkKohya
    from lycoris.utils.preset import read_preset

    preset = tmp_path / "preset.toml"
    preset.write_text(LYCORIS_PRESET)
    LycorisNetworkKohya.apply_preset(read_preset(str(preset)))


@pytest.mark.parametrize("variant", ["lora-tucker", "loha", "diag-oft"])
def test_kohya_output_loads_in_lycoris(variant: str, tmp_path: Path) -> None:
    """A UNet file written in LDM names (and a kohya OFT prefix) comes back canonical and LyCORIS-loadable."""
    from lycoris.kohya import create_network_from_weights

    opts = {"constraint": 1e-4, "rescaled": True} if variant == "diag-oft" else {}
    net = lc.create_network({"unet": tiny_sd1_unet()}, preset=UNET_PRESET, dim=4, alpha=2.0,
                            **{**_variant(variant), **opts})
    randomise(net, 5)
    src = tmp_path / "src.safetensors"
    net.save(src, base_family="sd1")
    ldm = tmp_path / "ldm.safetensors"
    convert_adapter(src, ldm, to="kohya", naming="ldm")
    if variant == "diag-oft":  # kohya's own OFT prefix: must come back as lora_unet_
        f = read_adapter(ldm)
        lc.files.write_adapter(ldm, {"oft_unet" + k[len("lora_unet"):]: m for k, m in f.modules.items()},
                               source_header=f.header, overwrite=True)
    out = tmp_path / "kohya.safetensors"
    report = convert_adapter(ldm, out, to="kohya")
    assert set(read_adapter(out).modules) == set(read_adapter(src).modules)
    assert all(m.note and "renamed" in m.note for m in report.modules.values())

    unet = tiny_sd1_unet()
    lyco, _ = lc.load_network(src, {"unet": unet})
    lyco.apply()
    expected = _unet_out(unet)
    _lycoris_preset(tmp_path)
    unet2 = tiny_sd1_unet()
    ref, _ = create_network_from_weights(1.0, str(out), None, tiny_clip_text_with_projection(), unet2,
                                         for_inference=True)
    assert len(ref.unet_loras) == len(net)
    ref.apply_to(None, unet2, False, True)
    assert rel_err(_unet_out(unet2), expected) < 1e-5


def _variant(name: str) -> dict[str, Any]:
    from adapter_files import VARIANTS

    return dict(VARIANTS[name])


# --------------------------------------------------------------------------------------------- ComfyUI formulas
def _comfy_decompose(dora: torch.Tensor, w: torch.Tensor, diff: torch.Tensor, alpha: float, s: float) -> torch.Tensor:
    """comfy/weight_adapter/base.py ``weight_decompose`` (float32)."""
    calc = w + diff * alpha
    if dora.shape[0] == calc.shape[0]:  # output axis: the norm of the *unpatched* weight
        norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = (calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1))
    calc = calc * (dora / (norm + torch.finfo(torch.float32).eps))
    return w + s * (calc - w) if s != 1.0 else calc


def _comfy_weight(w: torch.Tensor, t: dict[str, torch.Tensor], s: float = 1.0) -> torch.Tensor:
    """The weight ComfyUI patches for one module at strength ``s`` (the adapter kinds this test produces)."""
    w = w.float().clone()
    t = {k: v.float() for k, v in t.items()}
    alpha = float(t["alpha"].item()) if "alpha" in t else None
    if "diff" in t:
        return w + s * t["diff"]
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        a = alpha / down.shape[0] if alpha is not None else 1.0
        diff = torch.mm(up.flatten(1), down.flatten(1)).reshape(w.shape)
        if "dora_scale" in t:
            return _comfy_decompose(t["dora_scale"], w, diff, a, s)
        return w + s * a * diff
    blocks = t["oft_blocks"]
    q = blocks - blocks.transpose(-1, -2)
    if alpha:  # "alpha in oft/boft is for constraint"
        qn = torch.norm(q) + 1e-8
        if qn > alpha:
            q = q * alpha / qn
    eye = torch.eye(blocks.shape[-1])
    r = (eye + q) @ (eye - q).inverse()
    if blocks.ndim == 3:  # OFTAdapter: rescale is loaded, not applied; strength applied twice
        nb, bs = blocks.shape[:2]
        diff = torch.einsum("k n m, k n ... -> k m ...", r * s - s * eye, w.view(nb, bs, *w.shape[1:]))
        return w + s * diff.reshape(w.shape)
    inp = w  # BOFTAdapter
    m, _, b = blocks.shape[:3]
    for i in range(m):
        bi = r[i] if s == 1 else r[i] * s + (1 - s) * eye
        k = 2**i * (b // 2)
        inp = inp.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        inp = torch.einsum("b i j, b j ... -> b i ...", bi, inp)
        inp = inp.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    if "rescale" in t:
        inp = inp * t["rescale"]
    return w + s * (inp - w)


COMFY_CASES: dict[str, dict[str, Any]] = {
    "lora-dora": {},  # output-axis DoRA: ComfyUI divides by ‖W‖
    "diag-oft": {"constraint": 1e-4, "rescaled": True},
    "boft": {"constraint": 1e-4, "rescaled": True},
    "ia3": {},
    "loha": {},
}


@pytest.mark.parametrize("variant", list(COMFY_CASES))
def test_comfy_output_gives_our_weights_in_comfyui(
    variant: str, tmp_path: Path, base_dir: Path, weights: dict[str, Any]
) -> None:
    src = make_adapter(tmp_path / "a.safetensors", variant, **COMFY_CASES[variant])
    out = tmp_path / "comfy.safetensors"
    report = convert_adapter(src, out, to="comfy", base=base_dir)
    assert not report.dropped
    original, comfy = read_adapter(src), read_adapter(out)
    assert comfy.modules.keys() == original.modules.keys()
    errs, before = [], []
    for key, m in comfy.modules.items():
        w, _ = weights[key]
        ours = original.modules[key].merge(w.float())[0]
        if m.algorithm.name == "loha":  # kept as is: check ComfyUI's LoHa rule through our own ΔW
            assert _tensors_equal(m, original.modules[key])
            continue
        errs.append(rel_err(_comfy_weight(w, m.tensors), ours))
        if variant != "ia3":
            before.append(rel_err(_comfy_weight(w, original.modules[key].tensors) - w, ours - w))
    assert max(errs, default=0.0) < 1e-5
    if before:  # the unconverted file really is read differently by ComfyUI
        assert max(before) > 1e-3
    if variant == "lora-dora":  # at other strengths too (ComfyUI and Lyco both interpolate W → W_d)
        key = next(iter(comfy.modules))
        w, _ = weights[key]
        got = _comfy_weight(w, comfy.modules[key].tensors, 0.5)
        assert rel_err(got, original.modules[key].merge(w.float(), None, 0.5)[0]) < 1e-5


def test_comfy_oft_without_base(tmp_path: Path, weights: dict[str, Any]) -> None:
    """The constraint is baked into the blocks (lossless, no base needed); a rescale needs the base or is a loss."""
    src = make_adapter(tmp_path / "a.safetensors", "boft", constraint=1e-4, rescaled=True)
    convert_adapter(src, tmp_path / "b.safetensors", to="comfy")
    original, comfy = read_adapter(src), read_adapter(tmp_path / "b.safetensors")
    for key, m in comfy.modules.items():
        assert float(m.tensors["alpha"]) == 0.0
        w = weights[key][0].float()
        ours = original.modules[key].merge(w)[0]
        assert rel_err(_comfy_weight(w, m.tensors), ours) < 1e-5
        assert rel_err(m.merge(w)[0], ours) < 1e-5  # and the file still means the same to Lyco/LyCORIS
    oft = make_adapter(tmp_path / "o.safetensors", "diag-oft", constraint=1e-4, rescaled=True)
    with pytest.raises(InvalidConfigError, match=r"rescale.*--allow-loss"):
        convert_adapter(oft, tmp_path / "o2.safetensors", to="comfy")
    assert not (tmp_path / "o2.safetensors").exists()
    report = convert_adapter(oft, tmp_path / "o2.safetensors", to="comfy", allow_loss=True)
    assert len(report.warnings) > len(report.modules)  # one "lost" line per module, plus the strength note
    assert all("rescale" not in m.tensors for m in read_adapter(tmp_path / "o2.safetensors").modules.values())


def test_bake_oft_constraint_matches_the_constrained_rotation() -> None:
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(4, 8, 8, generator=g)
    t = {"oft_blocks": blocks, "alpha": torch.tensor(0.01)}
    baked = bake_oft_constraint(t)
    algo = lc.algorithms.get("diag-oft")
    layer = lc.layers.LayerInfo.from_weight((32, 5))
    w = torch.randn(32, 5, generator=g)
    want = algo.merge(w, None, t, layer)[0]
    assert rel_err(algo.merge(w, None, baked, layer)[0], want) < 1e-6
    assert rel_err(_comfy_weight(w, baked), want) < 1e-5
    assert rel_err(_comfy_weight(w, t), want) > 1e-3  # ComfyUI reads the unbaked alpha as a tighter bound


# --------------------------------------------------------------------------------------------- losses
def test_lossy_conversion_without_flag_fails_in_one_line(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a.safetensors", "ia3")
    out = tmp_path / "b.safetensors"
    with pytest.raises(InvalidConfigError) as e:
        convert_adapter(src, out, to="comfy")
    msg = str(e.value)
    assert "\n" not in msg
    assert "--allow-loss" in msg
    assert "(IA)³" in msg
    assert str(src) in msg
    assert not out.exists()
    report = convert_adapter(src, out, to="comfy", allow_loss=True)
    assert len(report.dropped) == len(read_adapter(src).modules)
    assert not report.modules
    # the CLI prints "lyco: error: <msg>" from the same exception: check the subcommand raises it
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["convert", str(src), "-o", str(tmp_path / "c.safetensors"), "--to", "comfy"])
    with pytest.raises(LycoError, match="--allow-loss"):
        args.func(args)
    args = parser.parse_args(["convert", str(src), "-o", str(tmp_path / "c.safetensors"), "--to", "comfy",
                              "--allow-loss", "--json"])
    assert args.func(args) == 0


def test_output_axis_dora_to_comfy_without_base_is_a_loss(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a.safetensors", "lora-dora")
    with pytest.raises(InvalidConfigError, match=r"DoRA.*--allow-loss"):
        convert_adapter(src, tmp_path / "b.safetensors", to="comfy")


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a.safetensors", "lora")
    with pytest.raises(LycoError):
        convert_adapter(src, src, to="kohya")
    convert_adapter(src, src, to="kohya", overwrite=True)


# --------------------------------------------------------------------------------------------- algorithms / dtype
def test_algo_lora_reports_the_svd_error(tmp_path: Path, weights: dict[str, Any]) -> None:
    src = make_adapter(tmp_path / "a.safetensors", "loha")
    report = convert_adapter(src, tmp_path / "b.safetensors", to="kohya", algo="lora", rank=3, conv_rank=2)
    original, out = read_adapter(src), read_adapter(tmp_path / "b.safetensors")
    for key, m in out.modules.items():
        assert m.algorithm.name == "lora"
        assert "dora_scale" not in m.tensors
        w = weights[key][0].float()
        exact = original.modules[key].delta_weight(w)
        conv_kxk = w.ndim == 4 and w.shape[-1] > 1
        assert m.tensors["lora_down.weight"].shape[0] == (2 if conv_kxk else 3)
        assert report.modules[key].rel_error == pytest.approx(rel_err(m.delta_weight(w), exact), rel=1e-3, abs=1e-6)
    assert 0.05 < report.max_rel_error() < 1  # rank 3 cannot hold a rank-16 LoHa change


def test_algo_lora_of_base_dependent_modules_needs_the_base(tmp_path: Path, base_dir: Path,
                                                           weights: dict[str, Any]) -> None:
    src = make_adapter(tmp_path / "a.safetensors", "lora-dora")
    with pytest.raises(InvalidConfigError, match=r"lora_\w+: .*DoRA.*--base"):
        convert_adapter(src, tmp_path / "b.safetensors", to="kohya", algo="lora", rank=4)
    report = convert_adapter(src, tmp_path / "b.safetensors", to="kohya", algo="full", base=base_dir)
    original, out = read_adapter(src), read_adapter(tmp_path / "b.safetensors")
    for key, m in out.modules.items():
        w = weights[key][0].float()
        assert m.algorithm.name == "full"
        assert rel_err(m.merge(w)[0], original.modules[key].merge(w)[0]) < 1e-6
    assert report.max_rel_error() is None


def test_dora_axis_needs_the_base_and_reports_the_fit(tmp_path: Path, base_dir: Path,
                                                      weights: dict[str, Any]) -> None:
    src = make_adapter(tmp_path / "a.safetensors", "lora-dora", dora_on_output=False)
    with pytest.raises(InvalidConfigError, match=r"cannot move"):
        convert_adapter(src, tmp_path / "b.safetensors", to="kohya", dora_axis="output")
    report = convert_adapter(src, tmp_path / "b.safetensors", to="kohya", dora_axis="output", base=base_dir)
    original, out = read_adapter(src), read_adapter(tmp_path / "b.safetensors")
    for key, m in out.modules.items():
        w = weights[key][0].float()
        assert m.describe()["dora"] == "output"
        exact = original.modules[key].delta_weight(w)
        assert report.modules[key].rel_error == pytest.approx(rel_err(m.delta_weight(w), exact), rel=1e-3, abs=1e-6)


def test_dtype_cast(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a.safetensors", "lora")
    convert_adapter(src, tmp_path / "b.safetensors", to="kohya", dtype="bf16")
    out = read_adapter(tmp_path / "b.safetensors")
    assert {t.dtype for m in out.modules.values() for t in m.tensors.values()} == {torch.bfloat16}


# --------------------------------------------------------------------------------------------- other bases
def _sd2_like_unet() -> UNet2DConditionModel:
    """tiny_sd1_unet's structure with SD2's differences: linear proj_in/proj_out, a wider cross-attention."""
    torch.manual_seed(0)
    cfg = {k: v for k, v in tiny_sd1_unet().config.items() if not k.startswith("_")}
    cfg.update(use_linear_projection=True, cross_attention_dim=48)
    return UNet2DConditionModel.from_config(cfg).eval()


@pytest.mark.parametrize("variant", ["lora", "lokr", "ia3", "glora", "full"])
def test_sd1_to_sd2_drops_exactly_the_listed_modules(variant: str, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a.safetensors", variant)
    out = tmp_path / "sd2.safetensors"
    with pytest.raises(InvalidConfigError, match="--allow-loss"):
        convert_adapter(src, out, to="kohya", to_base="sd2")
    report = convert_adapter(src, out, to="kohya", to_base="sd2", allow_loss=True)
    original, converted = read_adapter(src), read_adapter(out)
    te = {k for k in original.modules if k.startswith("lora_te")}
    kv = {k for k in original.modules if k.endswith(("attn2_to_k", "attn2_to_v"))}
    assert te
    assert kv
    assert set(report.dropped) == te | kv
    assert all("text encoder" in report.dropped[k] for k in te)
    assert all("768" in report.dropped[k] and "1024" in report.dropped[k] for k in kv)
    assert set(converted.modules) == set(original.modules) - te - kv
    sd2 = base_weights({"unet": _sd2_like_unet()})
    for key, m in converted.modules.items():
        w2 = sd2[key][0].float()  # every kept module fits the SD2 layer and changes it as on SD1
        ours = m.merge(w2)[0]
        want = original.modules[key].merge(w2.reshape(original_shape(key, w2)))[0].reshape(w2.shape)
        assert rel_err(ours, want) < 1e-6, key
    assert any(k.endswith("proj_in") for k in converted.modules)
    # and back: SD2 → SD1 restores the original tensors of what was kept
    back = tmp_path / "sd1.safetensors"
    report = convert_adapter(out, back, to="kohya", to_base="sd1")
    assert not report.dropped  # no TE or K/V left to lose, so no flag needed
    again = read_adapter(back)
    assert all(_tensors_equal(again.modules[k], original.modules[k]) for k in again.modules)


def original_shape(key: str, w2: torch.Tensor) -> tuple[int, ...]:
    """SD1's weight shape for an SD2 layer: proj_in/proj_out are conv 1×1 there."""
    return (*w2.shape, 1, 1) if key.endswith(("proj_in", "proj_out")) else tuple(w2.shape)


def test_cross_family_refusals_and_same_family(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a.safetensors", "lora")
    with pytest.raises(IncompatibleBaseError, match=r"sd1 → sdxl.*2048") as e:
        convert_adapter(src, tmp_path / "x.safetensors", to="kohya", to_base="sdxl")
    assert "\n" not in str(e.value)
    report = convert_adapter(src, tmp_path / "same.safetensors", to="kohya", to_base="sd1")
    assert "carry over unchanged" in report.warnings[0]
    assert not report.dropped
    again, original = read_adapter(tmp_path / "same.safetensors"), read_adapter(src)
    assert all(_tensors_equal(again.modules[k], original.modules[k]) for k in original.modules)


def test_project_change_keeps_what_lies_in_the_target_subspace() -> None:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    v, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    target = u[:, :3] @ torch.diag(torch.tensor([5.0, 4.0, 3.0])) @ v[:, :3].T  # rank 3
    inside = u[:, :2] @ torch.randn(2, 2, generator=g) @ v[:, :2].T
    outside = u[:, 5:7] @ torch.randn(2, 2, generator=g) @ v[:, 5:7].T
    p, share = project_change(inside + outside, target, k=3)
    assert rel_err(p, inside) < 1e-5
    assert share == pytest.approx(float(inside.norm() / (inside + outside).norm()), rel=1e-4)


def test_lora_x_projection_between_bases(tmp_path: Path, base_dir: Path, weights: dict[str, Any]) -> None:
    """--base TARGET --from-base SOURCE: each module becomes the projected LoRA, its kept share reported."""
    m = models()
    with torch.no_grad():
        for p in m["unet"].parameters():
            p.add_(torch.randn_like(p) * 0.01)
    target = save_pipeline(tmp_path / "target", m["unet"], m["te"])
    src = make_adapter(tmp_path / "a.safetensors", "loha")
    report = convert_adapter(src, tmp_path / "b.safetensors", to="kohya", base=target, from_base=base_dir,
                             project_rank=6)
    original, out = read_adapter(src), read_adapter(tmp_path / "b.safetensors")
    assert out.modules.keys() == original.modules.keys()
    tw = base_weights({"unet": m["unet"], "te": m["te"]})
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"
    dw = original.modules[key].delta_weight(weights[key][0].float())
    want, share = project_change(dw, tw[key][0], 6)
    assert rel_err(out.modules[key].delta_weight(tw[key][0].float()), want) < 1e-4
    assert f"{share:.1%}" in (report.modules[key].note or "")
    assert 0 < share < 1


# --------------------------------------------------------------------------------------------- diffusers / PEFT
def _fused(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Merge every PEFT layer diffusers injected into its base layer; module path → fused weight."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
            out[name] = m.get_base_layer().weight.detach().clone()
    return out


def test_to_diffusers_loads_in_diffusers_and_matches_our_bake(tmp_path: Path, weights: dict[str, Any]) -> None:
    """A LoHa file cannot go to diffusers as is; with --algo lora (full rank here, so exact) diffusers'
    loaders + PEFT fusing give the weights Lyco merges from the LoHa file."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    from lyco_core.formats.key_paths import format_key

    src = make_adapter(tmp_path / "a.safetensors", "loha")
    out = tmp_path / "diffusers.safetensors"
    with pytest.raises(InvalidConfigError, match="--algo lora --rank R"):
        convert_adapter(src, out, to="diffusers")
    report = convert_adapter(src, out, to="diffusers", algo="lora", rank=16)
    assert report.max_rel_error() < 1e-5  # a rank-4 LoHa change has rank ≤ 16
    model = models()
    sd, alphas, metadata = Loader.lora_state_dict(str(out), return_lora_metadata=True)
    Loader.load_lora_into_unet(sd, alphas, model["unet"], metadata=metadata)
    Loader.load_lora_into_text_encoder(sd, alphas, model["te"], metadata=metadata)
    fused = {format_key("unet", n): w for n, w in _fused(model["unet"]).items()}
    fused |= {format_key("te", "text_model." + n): w for n, w in _fused(model["te"]).items()}
    original = read_adapter(src)
    assert sorted(fused) == sorted(original.modules)
    for key, w in fused.items():
        assert rel_err(w, original.modules[key].merge(weights[key][0].float())[0]) < 1e-5, key
    # and the diffusers file reads back (dotted keys detected) to the same change
    convert_adapter(out, tmp_path / "back.safetensors", to="kohya")
    back = read_adapter(tmp_path / "back.safetensors")
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    w = weights[key][0].float()
    assert rel_err(back.modules[key].delta_weight(w), original.modules[key].delta_weight(w)) < 1e-5


def test_to_peft_writes_the_peft_layout(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a.safetensors", "lora")
    out = convert_adapter(src, tmp_path / "peft", to="peft").output
    assert out is not None
    assert (Path(out) / "unet" / "adapter_config.json").is_file()
    assert (Path(out) / "text_encoder" / "adapter_model.safetensors").is_file()
    convert_adapter(Path(out), tmp_path / "back.safetensors", to="kohya")
    original, back = read_adapter(src), read_adapter(tmp_path / "back.safetensors")
    assert back.modules.keys() == original.modules.keys()
    for k, m in original.modules.items():
        shape = m.algorithm.implied_weight_shape(m.tensors)
        w = torch.zeros(shape)
        assert rel_err(back.modules[k].delta_weight(w), m.delta_weight(w)) < 1e-6
