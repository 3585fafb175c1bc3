"""lyco_trainer.models: tiny pipelines, loading bases (folders, single files), latent/text caches, SDXL conditioning.

References are diffusers itself: its pipeline classes load the tiny folders, its ``encode_prompt`` /
``_get_add_time_ids`` give the expected conditioning, and single files are written with lyco_core's UNet naming and
an LDM VAE naming written here, then read back through diffusers' converters (independent code on both sides).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from checkpoints import ldm_state_dict
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lyco_core.errors import FileExistsLycoError, IncompatibleBaseError, InvalidConfigError, NotFoundError
from lyco_trainer.config import ModelConfig
from lyco_trainer.models import (
    LatentCache,
    TextCache,
    encode_text,
    load_base,
    sdxl_time_ids,
    shipped_config,
    write_tiny_pipeline,
)

PIPELINES = {"sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
CAPTIONS = ["a photo of sks dog", "red circle on blue background, high quality"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: write_tiny_pipeline(root / f, f, seed=0) for f in ("sd1", "sdxl")}


def _unet_out(unet: UNet2DConditionModel, family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    kw = {}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        return unet(torch.randn(1, 4, 4, 4, generator=g), torch.tensor([500]),
                    torch.randn(1, 77, unet.config.cross_attention_dim, generator=g), **kw).sample


# ------------------------------------------------------------------------------------------------ tiny pipelines
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_tiny_pipeline_loads_in_diffusers_and_load_base(tiny: dict[str, Path], family: str) -> None:
    folder = tiny[family]
    for sub in ["tokenizer"] + (["tokenizer_2"] if family == "sdxl" else []):
        assert (folder / sub / "vocab.json").is_file()
        assert (folder / sub / "merges.txt").read_text().startswith("#version: 0.2\n")
    pipe = PIPELINES[family].from_pretrained(folder, local_files_only=True)
    base = load_base(ModelConfig(base=folder))
    assert base.family == family
    assert base.prediction == "epsilon"
    assert base.scheduler.config.prediction_type == "epsilon"
    assert type(base.scheduler).__name__ == "DDPMScheduler"
    assert torch.equal(base.scheduler.betas, pipe.scheduler.betas)  # same noise schedule as the sampling scheduler
    assert len(base.text_encoders) == len(base.tokenizers) == (2 if family == "sdxl" else 1)
    assert base.vae_scale_factor == pipe.vae_scale_factor == 8
    assert not any(p.requires_grad for p in base.unet.parameters())
    assert torch.equal(_unet_out(base.unet, family), _unet_out(pipe.unet, family))
    assert _unet_out(base.unet, family).abs().mean() > 0
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert base.model_hash == hashlib.sha256(unet_file.read_bytes()).hexdigest()
    # the tokenizer is a real BPE: known words are single tokens, unknown ones split into merges/bytes
    tok = base.tokenizers[0]
    assert tok.convert_ids_to_tokens(tok("a photo of sks dog").input_ids)[1:-1] == ["a</w>", "photo</w>", "of</w>",
                                                                                   "sks</w>", "dog</w>"]
    assert len(tok("zebra").input_ids) > 3


def test_tiny_pipeline_is_deterministic_and_refuses_overwrite(tiny: dict[str, Path], tmp_path: Path) -> None:
    again = write_tiny_pipeline(tmp_path / "a", "sd1", seed=0)
    other = write_tiny_pipeline(tmp_path / "b", "sd1", seed=1)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (again / name).read_bytes() == (tiny["sd1"] / name).read_bytes()
    assert (other / name).read_bytes() != (again / name).read_bytes()
    with pytest.raises(FileExistsLycoError, match=str(tmp_path / "a")):
        write_tiny_pipeline(tmp_path / "a", "sd1")
    write_tiny_pipeline(tmp_path / "a", "sd1", seed=1, overwrite=True)
    assert (tmp_path / "a" / name).read_bytes() == (other / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folder left


def test_load_base_options_and_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    v = load_base(ModelConfig(base=tiny["sd1"], prediction="v"))
    assert v.prediction == "v"
    assert v.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(IncompatibleBaseError, match=r"model\.family"):
        load_base(ModelConfig(base=tiny["sdxl"], family="sd1"))
    with pytest.raises(NotFoundError, match="nowhere"):
        load_base(ModelConfig(base=tmp_path / "nowhere"))
    # a separate VAE (model.vae) replaces the pipeline's
    vae_dir = tmp_path / "vae"
    torch.manual_seed(5)
    AutoencoderKL(**_vae_kwargs(tiny["sd1"])).save_pretrained(vae_dir)
    other = load_base(ModelConfig(base=tiny["sd1"], vae=vae_dir))
    ref = AutoencoderKL.from_pretrained(vae_dir)
    assert all(torch.equal(a, b) for a, b in zip(other.vae.state_dict().values(), ref.state_dict().values()))


def _vae_kwargs(folder: Path) -> dict[str, object]:
    return {k: v for k, v in json.loads((folder / "vae" / "config.json").read_text()).items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------ single files
def vae_to_ldm(sd: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM ``first_stage_model.`` naming (CompVis layout)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^(encoder|decoder)\.conv_norm_out", r"\1.norm_out", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.block.{m.group(2)}", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.upsample", n)
        n = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m.group(1)) + 1}", n)
        n = n.replace("conv_shortcut", "nin_shortcut")
        attn = re.match(r"^(.*)mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", n)
        if attn:
            part = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[attn.group(2)]
            n = f"{attn.group(1)}mid.attn_1.{part}.{attn.group(3)}"
            if v.ndim == 2:
                v = v[:, :, None, None]  # LDM attention projections are 1×1 convs
        out[f"first_stage_model.{n}"] = v
    return out


def write_single_file(folder: Path, family: str, path: Path) -> Path:
    """The tiny pipeline at ``folder`` as one LDM checkpoint (UNet by lyco_core's naming, CLIP/OpenCLIP, VAE);
    family "sd2" writes the tiny SD1 pipeline with an OpenCLIP text encoder (what makes a file SD 2.x)."""
    pipe = PIPELINES["sdxl" if family == "sdxl" else "sd1"].from_pretrained(folder, local_files_only=True)
    if family in ("sd1", "sd2"):  # sd2: the text encoder in OpenCLIP layout (q/k/v fused), as SD 2.x files have it
        sd = ldm_state_dict(pipe.unet, pipe.text_encoder, te_layout=family)
    else:
        sd = ldm_state_dict(pipe.unet, pipe.text_encoder, te_layout="sdxl", te2=pipe.text_encoder_2)
        sd["conditioner.embedders.1.model.text_projection"] = pipe.text_encoder_2.text_projection.weight.T.contiguous()
    del sd["first_stage_model.decoder.conv_in.weight"]  # ldm_state_dict's placeholder; the real VAE follows
    sd.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    sd = {k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 1}, path)
    else:
        save_file(sd, str(path))
    return path


@pytest.mark.parametrize(("family", "suffix"), [("sd1", ".safetensors"), ("sd1", ".ckpt"), ("sd2", ".safetensors"),
                                              ("sdxl", ".safetensors")])
def test_single_file_loads_like_the_folder(tiny: dict[str, Path], tmp_path: Path, family: str, suffix: str) -> None:
    folder = tiny["sdxl" if family == "sdxl" else "sd1"]
    path = write_single_file(folder, family, tmp_path / f"model{suffix}")
    single = load_base(ModelConfig(base=path, tokenizer=folder), config_dir=folder)
    ref = load_base(ModelConfig(base=folder))
    assert single.kind == "single-file"
    assert single.family == family  # read from the file (OpenCLIP text encoder → sd2)
    assert single.prediction == "epsilon"  # config_dir's scheduler config
    assert single.model_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    # the same weights, bit for bit; outputs equal up to float rounding: the single file's tensors are memory-mapped at
    # arbitrary offsets, and CPU kernels take other code paths on unaligned memory (differences of ~1e-7)
    for name, model in (("unet", "unet"), ("vae", "vae")):
        got, want = getattr(single, model).state_dict(), getattr(ref, model).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    torch.testing.assert_close(_unet_out(single.unet, family), _unet_out(ref.unet, family), rtol=0, atol=1e-5)
    px = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(single.vae.encode(px).latent_dist.mean, ref.vae.encode(px).latent_dist.mean,
                                   rtol=0, atol=1e-5)
        z = torch.ones(1, 4, 4, 4)
        assert torch.equal(single.vae.decode(z).sample, ref.vae.decode(z).sample)
        a, b = encode_text(single, CAPTIONS), encode_text(ref, CAPTIONS)
    assert torch.equal(a.hidden, b.hidden)
    if family == "sdxl":
        assert a.pooled is not None
        assert b.pooled is not None
        assert torch.equal(a.pooled, b.pooled)


def test_single_file_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    path = write_single_file(tiny["sd1"], "sd1", tmp_path / "m.safetensors")
    with pytest.raises(InvalidConfigError, match=r"model\.tokenizer"):
        load_base(ModelConfig(base=path))
    with pytest.raises(IncompatibleBaseError, match=r"model\.family"):
        load_base(ModelConfig(base=path, tokenizer=tiny["sd1"], family="sdxl"))
    # the shipped SD 1.5 configs do not fit tiny weights: a one-line error naming the file, not a traceback
    with pytest.raises(IncompatibleBaseError, match=r"m\.safetensors: the UNet"):
        load_base(ModelConfig(base=path, tokenizer=tiny["sd1"]))
    no_vae = {k: v for k, v in load_file(str(path)).items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, str(tmp_path / "novae.safetensors"))
    with pytest.raises(NotFoundError, match=r"model\.vae"):
        load_base(ModelConfig(base=tmp_path / "novae.safetensors", tokenizer=tiny["sd1"]), config_dir=tiny["sd1"])


def _clip_params(family: str, component: str) -> int:
    cfg = {k: v for k, v in shipped_config(family, component).items() if k not in ("architectures", "model_type")}
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    with torch.device("meta"):
        return sum(p.numel() for p in cls(CLIPTextConfig(**cfg)).parameters())


def test_shipped_configs_build_the_released_architectures() -> None:
    """Parameter counts of the released models (SD 1.5, SD 2.1, SDXL base 1.0), on the meta device."""
    expected = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}
    for family, n in expected.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(shipped_config(family, "unet"))
            vae = AutoencoderKL.from_config(shipped_config(family, "vae"))
        assert sum(p.numel() for p in unet.parameters()) == n
        assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert _clip_params("sd1", "text_encoder") == _clip_params("sdxl", "text_encoder") == 123_060_480  # CLIP ViT-L
    assert _clip_params("sd2", "text_encoder") == 340_387_840  # OpenCLIP ViT-H, 23 of 24 layers
    assert _clip_params("sdxl", "text_encoder_2") == 694_659_840  # OpenCLIP bigG with projection
    assert shipped_config("sd2", "scheduler")["prediction_type"] == "v_prediction"


# ------------------------------------------------------------------------------------------------ latents
def test_latent_cache_modes_hit_miss_and_identical(tiny: dict[str, Path], tmp_path: Path) -> None:
    base = load_base(ModelConfig(base=tiny["sd1"]))
    img = tmp_path / "img.png"
    img.write_bytes(b"pretend image bytes")
    px = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    calls: list[int] = []

    def pixels() -> torch.Tensor:
        calls.append(1)
        return px

    mem = LatentCache(base.vae, "memory")
    z = mem.get(img, (48, 32), pixels)
    assert z.shape == (4, 4, 6)
    assert torch.equal(mem.get(img, (48, 32), pixels), z)
    assert (mem.hits, mem.misses, len(calls)) == (1, 1, 1)
    # independent computation: the posterior sample with the key's seed, times the scaling factor
    seed = int(mem.key(img, (48, 32))[:15], 16)
    with torch.no_grad():
        dist = base.vae.encode(px[None]).latent_dist
    expected = dist.sample(generator=torch.Generator().manual_seed(seed))[0] * 0.18215
    assert torch.allclose(z, expected, atol=1e-6)
    assert not torch.equal(z, dist.mean[0] * 0.18215)

    disk_dir = tmp_path / "cache"
    d1 = LatentCache(base.vae, "disk", disk_dir)
    assert torch.equal(d1.get(img, (48, 32), pixels), z)
    d2 = LatentCache(base.vae, "disk", disk_dir)  # a later run: answered from disk
    assert torch.equal(d2.get(img, (48, 32), pixels), z)
    assert (d1.misses, d2.hits, d2.misses) == (1, 1, 0)
    assert [p.suffix for p in disk_dir.iterdir()] == [".safetensors"]  # no temporary files left
    assert torch.equal(LatentCache(base.vae, "none").get(img, (48, 32), pixels), z)

    # a new bucket, changed bytes or another VAE are new keys
    k = d2.key(img, (48, 32))
    assert d2.key(img, (32, 48)) != k
    assert LatentCache(base.vae, "memory", identity="other-vae").key(img, (48, 32)) != k
    img.write_bytes(b"edited image bytes!")
    assert d2.key(img, (48, 32)) != k
    with pytest.raises(InvalidConfigError, match="disk"):
        LatentCache(base.vae, "disk")


# ------------------------------------------------------------------------------------------------ text
def test_encode_text_matches_diffusers_sd1(tiny: dict[str, Path]) -> None:
    base = load_base(ModelConfig(base=tiny["sd1"]))
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd1"], local_files_only=True)
    with torch.no_grad():
        cond = encode_text(base, CAPTIONS)
        ref, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)
    assert cond.hidden.shape == (2, 77, 32)
    assert cond.pooled is None
    assert torch.equal(cond.hidden, ref)


def test_encode_text_and_time_ids_match_diffusers_sdxl(tiny: dict[str, Path]) -> None:
    base = load_base(ModelConfig(base=tiny["sdxl"]))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"], local_files_only=True)
    with torch.no_grad():
        cond = encode_text(base, CAPTIONS)
        ref, _, ref_pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    assert cond.hidden.shape == (2, 77, 64)  # 32 (te1) + 32 (te2), like 768 + 1280
    assert cond.pooled is not None
    assert cond.pooled.shape == (2, 32)
    assert torch.equal(cond.hidden, ref)
    assert torch.equal(cond.pooled, ref_pooled)

    ids = sdxl_time_ids((512, 768), (16, 0), (480, 768))
    ref_ids = pipe._get_add_time_ids((512, 768), (16, 0), (480, 768), dtype=torch.float32,
                                     text_encoder_projection_dim=32)
    assert ids.shape == (6,)
    assert torch.equal(ids, ref_ids[0])

    cache = TextCache(base)
    first = cache.get([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]])
    second = cache.get([CAPTIONS[1], ""])
    assert (cache.misses, cache.hits, len(cache)) == (3, 2, 3)
    assert torch.equal(first.hidden[1], cond.hidden[1])
    assert torch.equal(first.hidden[2], cond.hidden[0])
    assert first.pooled is not None
    assert torch.equal(first.pooled[0], cond.pooled[0])
    assert torch.equal(second.hidden[0], cond.hidden[1])
