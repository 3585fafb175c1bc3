"""CLIP image and text features: the *projected* embeddings (not normalised), as open_clip's ``encode_image`` /
``encode_text`` in the official code.

Two back ends: transformers ``CLIPModel`` (``get_image_features`` / ``get_text_features``) for a ``save_pretrained``
folder (the laion repos ship one), and open_clip for a checkpoint file when ``open_clip_torch`` is installed (an
optional extra, imported only then). Images are resized to the vision tower's input size with the model's mean/std
(OpenAI's constants unless the folder's ``preprocessor_config.json`` says otherwise).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lyco_core.errors import InvalidConfigError, NotFoundError, UnknownFormatError

from .base import Encoder, file_fingerprint, module_fingerprint, pick_device
from .hf import folder_fingerprint, from_pretrained, read_config, resolve_folder
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

if TYPE_CHECKING:
    from transformers import CLIPModel

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: The tiny test model's towers (spec §9); the vocabulary is lyco_trainer's tiny byte-level BPE tokenizer.
TINY_CLIP_TEXT: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "max_position_embeddings": 77}
TINY_CLIP_VISION: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
TINY_CLIP_PROJECTION = 16
DEFAULT_OPEN_CLIP_ARCH = "ViT-L-14"


def _pooled(out: Any) -> torch.Tensor:
    """transformers v4 returns a tensor from get_*_features, v5 a BaseModelOutputWithPooling (projected pooler)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEncoder(Encoder):
    """transformers ``CLIPModel``: projected image (N, P) and text (N, P) embeddings."""

    kind = "clip"

    def __init__(self, model: Any, tokenizer: Any, **kw: Any) -> None:
        """``model``: a transformers ``CLIPModel`` (typed Any: its .to/.config annotations do not type-check)."""
        super().__init__(**kw)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        cfg: Any = self.model.config.text_config
        self.max_length = int(min(getattr(tokenizer, "model_max_length", 77) or 77, cfg.max_position_embeddings))
        eos = cfg.eos_token_id
        # CLIP pools the first eos_token_id position (argmax of ids for the legacy id 2); a config whose eos id is
        # not the tokenizer's would silently pool position 0.
        if eos != 2 and tokenizer.eos_token_id != eos:
            raise InvalidConfigError(
                f"{self.source}: text_config.eos_token_id {eos} differs from the tokenizer's eos id "
                f"{tokenizer.eos_token_id}; text pooling would read the wrong token"
            )

    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask (N, L), padded to the longest and truncated to 77 tokens as open_clip."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def text_features(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """Projected text embeddings → float32 (N, P) on the CPU, not normalised."""
        if len(texts) == 0:
            raise InvalidConfigError("clip encoder: no texts given")
        out: list[torch.Tensor] = []
        for i in range(0, len(texts), max(1, batch_size)):
            tokens = self.tokenize(texts[i : i + batch_size])
            with self._precision():
                feats = _pooled(self.model.get_text_features(**tokens))
            out.append(self._finite(feats, "text features"))
        return torch.cat(out)


class OpenClipEncoder(Encoder):
    """open_clip model: ``encode_image`` / ``encode_text`` projected embeddings (the official code's CLIP)."""

    kind = "clip"

    def __init__(self, model: Any, tokenizer: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer

    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)  # type: ignore[no-any-return]

    def text_features(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """Projected text embeddings → float32 (N, P) on the CPU (open_clip tokenizer: 77 tokens, truncating)."""
        if len(texts) == 0:
            raise InvalidConfigError("clip encoder: no texts given")
        out: list[torch.Tensor] = []
        for i in range(0, len(texts), max(1, batch_size)):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            with self._precision():
                feats = self.model.encode_text(tokens)
            out.append(self._finite(feats, "text features"))
        return torch.cat(out)


def _tiny_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    from lyco_trainer.models.tiny import write_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(str(write_tokenizer_files(Path(tmp))))


def tiny_clip_model(tokenizer: Any, seed: int = 0) -> CLIPModel:
    """A tiny random ``CLIPModel`` (spec §9 sizes, projection 16) over ``tokenizer``'s vocabulary, deterministic."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(TINY_CLIP_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg = CLIPConfig(text_config=text, vision_config=dict(TINY_CLIP_VISION), projection_dim=TINY_CLIP_PROJECTION)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(cfg).eval()


def _norm_constants(folder: Path) -> tuple[Sequence[float], Sequence[float]]:
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        try:
            data = json.loads(pre.read_text())
        except json.JSONDecodeError as e:
            raise UnknownFormatError(f"{pre}: unreadable JSON") from e
        mean, std = data.get("image_mean"), data.get("image_std")
        if isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3:
            return mean, std
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def _load_open_clip(path: Path, arch: str | None, common: dict[str, Any]) -> OpenClipEncoder:
    try:
        import open_clip  # type: ignore[import-not-found]
    except ImportError as e:
        raise InvalidConfigError(
            f"{path}: a CLIP checkpoint file needs open_clip (pip install 'lyco-evaluator[open_clip]'); "
            "or give a transformers CLIPModel folder"
        ) from e
    name = arch or DEFAULT_OPEN_CLIP_ARCH
    try:
        model = open_clip.create_model(name, pretrained=str(path), device="cpu")
    except RuntimeError as e:
        raise UnknownFormatError(f"{path}: not an open_clip {name} checkpoint ({str(e).splitlines()[0][:160]})") from e
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    mean = getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_CLIP_STD
    common = dict(common, image_size=common["image_size"] or int(size), mean=mean, std=std)
    ident = f"clip:open_clip:{name}:{file_fingerprint([path])}"
    return OpenClipEncoder(model, open_clip.get_tokenizer(name), identity=ident, source=str(path), **common)


def load_clip(
    path: Path | str | None,
    *,
    tiny: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    arch: str | None = None,
    device: str | torch.device | None = None,
    autocast: bool | None = None,
) -> Encoder:
    """A CLIP encoder: the tiny model (``tiny``), a transformers folder (or a hub id cached locally), or an open_clip
    checkpoint file (``arch``: the open_clip model name, default ViT-L-14)."""
    dev = pick_device(device)
    common: dict[str, Any] = {"image_size": image_size, "device": dev, "autocast": autocast}
    if tiny:
        tok = _tiny_tokenizer()
        model = tiny_clip_model(tok, seed)
        ident = f"clip:tiny:{module_fingerprint(model, [TINY_CLIP_TEXT, TINY_CLIP_VISION])}"
        common.update(image_size=image_size or TINY_CLIP_VISION["image_size"], mean=OPENAI_CLIP_MEAN,
                      std=OPENAI_CLIP_STD)
        return ClipEncoder(model, tok, identity=ident, source="tiny clip", **common)
    if path is not None and Path(path).expanduser().is_file():
        return _load_open_clip(Path(path).expanduser(), arch, common)
    from transformers import AutoTokenizer, CLIPModel

    folder = resolve_folder(path, "clip")  # type: ignore[arg-type]
    if read_config(folder).get("model_type") != "clip":
        raise UnknownFormatError(f"{folder}: config.json is not a CLIPModel (model_type must be 'clip')")
    model = from_pretrained(CLIPModel, folder, "clip")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise NotFoundError(f"{folder}: no CLIP tokenizer files (vocab.json/merges.txt or tokenizer.json)") from e
    mean, std = _norm_constants(folder)
    common.update(image_size=image_size or int(model.config.vision_config.image_size), mean=mean, std=std)
    ident = f"clip:{folder.name}:{folder_fingerprint(folder, TOKENIZER_FILES)}"
    return ClipEncoder(model, tok, identity=ident, source=str(folder), **common)


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Save the tiny CLIP as a transformers folder: model, tokenizer files and ``preprocessor_config.json``."""
    from lyco_trainer.models.tiny import write_tokenizer_files

    tok = _tiny_tokenizer()
    tiny_clip_model(tok, seed).save_pretrained(str(folder))
    write_tokenizer_files(folder)
    size = TINY_CLIP_VISION["image_size"]
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
           "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_normalize": True,
           "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "resample": 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return folder
