"""Tiny but real Stable Diffusion pipelines, built from configs with no download: the base of tests and the demo.

:func:`write_tiny_pipeline` writes a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/`` and for SDXL ``text_encoder_2/``, ``tokenizer_2/``) that
``diffusers.StableDiffusionPipeline.from_pretrained`` (``StableDiffusionXLPipeline`` for SDXL) and
:func:`lyco_trainer.models.load_base` both load. The architecture keeps the structure of the released models at a
tiny width:

* UNet: ``block_out_channels`` (16, 32), 2 resnets per block, cross-attention at level 0 and in the mid block (SD1
  layout: conv ``proj_in``); SDXL: attention at level 1 with transformer depth 2, linear ``proj_in`` and the
  ``text_time`` size conditioning.
* VAE: 4 levels (8, 8, 16, 16 channels) so that latents are 1/8 of the image size as in the real models.
* CLIP text encoder(s): hidden 32, 2 layers, 4 heads, 77 positions; SDXL's second encoder has a 32-d projection
  (the pooled embedding) and the UNet's cross-attention width is 32 + 32 = 64, like 768 + 1280 = 2048.
* Tokenizer(s): a real byte-level BPE CLIP tokenizer (``vocab.json`` / ``merges.txt``) whose vocabulary is the 512
  byte symbols (with and without ``</w>``), merges learned from a small built-in corpus, and the two special tokens.

Weights are deterministic for a ``seed`` (the global torch RNG is left as it was).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch

from lyco_core.errors import FileExistsLycoError, InvalidConfigError

TinyFamily = Literal["sd1", "sdxl"]

#: Words the tiny tokenizer's merges are learned from (captions of tests and the demo use them).
CORPUS = (
    "a photo of sks dog cat person man woman painting drawing style portrait landscape red green blue yellow "
    "white black orange purple circle square triangle stripes dots shape on background with the and in an "
    "image picture of high quality detailed art anime realistic sky tree house car flower face smiling"
)
N_MERGES = 200
CLIP_HIDDEN = 32
MAX_TOKENS = 77


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte → printable unicode character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def learn_bpe(corpus: str, n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary: byte symbols, byte symbols + ``</w>``, ``n_merges`` merges, special tokens.

    Merges are learned greedily (most frequent adjacent pair, ties broken by the pair's text) on ``corpus``'s words,
    so the result is deterministic.
    """
    table = bytes_to_unicode()
    symbols = list(table.values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    words = Counter(corpus.lower().split())
    split: dict[tuple[str, ...], int] = {}
    for w, c in words.items():
        chars = [table[b] for b in w.encode("utf-8")]
        split[(*chars[:-1], chars[-1] + "</w>")] = c
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for sym, c in split.items():
            for a, b in itertools.pairwise(sym):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab_list.append(best[0] + best[1])
        new_split: dict[tuple[str, ...], int] = {}
        for sym, c in split.items():
            out: list[str] = []
            i = 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new_split[tuple(out)] = c
        split = new_split
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer_files(folder: Path, *, pad_token: str = "<|endoftext|>", configs: bool = True) -> Path:
    """Write a CLIP tokenizer folder: vocab.json, merges.txt and (``configs``) tokenizer_config.json and
    special_tokens_map.json."""
    vocab, merges = learn_bpe(CORPUS, N_MERGES)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if not configs:
        return folder
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "do_lower_case": True,
              "clean_up_tokenization_spaces": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def _clip_config(vocab_size: int, pad_id: int, projection_dim: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=CLIP_HIDDEN * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=pad_id,
    )


def tiny_unet_config(family: TinyFamily) -> dict[str, Any]:
    """The tiny UNet's diffusers config (``UNet2DConditionModel(**config)``)."""
    common: dict[str, Any] = {
        "sample_size": 4,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (16, 32),
        "layers_per_block": 2,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    }
    if family == "sd1":
        return {
            **common,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": CLIP_HIDDEN,
        }
    return {
        **common,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "cross_attention_dim": 2 * CLIP_HIDDEN,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + CLIP_HIDDEN,
    }


def tiny_vae_config(family: TinyFamily) -> dict[str, Any]:
    """The tiny VAE's diffusers config: 4 levels (downsampling ×8), 4 latent channels, the family's scaling factor."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 16, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
        "scaling_factor": 0.18215 if family == "sd1" else 0.13025,
    }


def scheduler_config(family: TinyFamily) -> dict[str, Any]:
    """The released pipelines' sampling scheduler settings (SD1: PNDM, SDXL: Euler), both scaled-linear betas."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "prediction_type": "epsilon",
        **({"skip_prk_steps": True, "set_alpha_to_one": False} if family == "sd1" else {"timestep_spacing": "leading"}),
    }


def build_tiny_pipeline(family: TinyFamily = "sd1", seed: int = 0, tokenizer_dir: Path | None = None) -> Any:
    """The tiny pipeline as a diffusers pipeline object (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``).

    ``tokenizer_dir``: a folder to write the tokenizer files to and load them from (a temporary one when None).
    """
    import tempfile

    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in ("sd1", "sdxl"):
        raise InvalidConfigError(f"family {family!r}: a tiny pipeline is 'sd1' or 'sdxl'")
    with tempfile.TemporaryDirectory() as tmp:
        tdir = tokenizer_dir or Path(tmp) / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer_files(tdir)))
        tokenizer_2 = None
        if family == "sdxl":
            t2dir = tdir.parent / (tdir.name + "_2")
            tokenizer_2 = CLIPTokenizer.from_pretrained(str(write_tokenizer_files(t2dir, pad_token="!")))
    vocab_size = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config(family)).eval()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**tiny_vae_config(family)).eval()
        torch.manual_seed(seed + 2)
        eos = vocab_size - 1
        te = CLIPTextModel(_clip_config(vocab_size, eos, CLIP_HIDDEN)).eval()
        if family == "sd1":
            sched = PNDMScheduler(**scheduler_config(family))
            return StableDiffusionPipeline(
                vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sched,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        torch.manual_seed(seed + 3)
        assert tokenizer_2 is not None
        te2 = CLIPTextModelWithProjection(_clip_config(vocab_size, tokenizer_2.pad_token_id, CLIP_HIDDEN)).eval()
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
            scheduler=EulerDiscreteScheduler(**scheduler_config(family)),
        )


def write_tiny_pipeline(folder: str | Path, family: TinyFamily = "sd1", seed: int = 0, *,
                        overwrite: bool = False) -> Path:
    """Write a tiny diffusers pipeline folder (see the module doc) and return its path.

    The folder is built next to ``folder`` and renamed into place, so a crash leaves no half pipeline. An existing
    non-empty ``folder`` is an error unless ``overwrite``.
    """
    import shutil
    import tempfile

    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsLycoError(f"{out}: already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe = build_tiny_pipeline(family, seed)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # the BPE source files, next to what the tokenizer's save wrote (transformers 5 writes tokenizer.json)
        write_tokenizer_files(tmp / "tokenizer", configs=False)
        if family == "sdxl":
            write_tokenizer_files(tmp / "tokenizer_2", configs=False)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
