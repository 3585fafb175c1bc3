"""Evaluation prompts (paper §4.1, §5.2): the prompt types, the shipped templates and the expansion to N images.

Prompt types, per concept (one (sub)class folder of the dataset):

===================  ===============================================================================================
``train``            the training captions of the concept's images (descriptor + caption tags, in file order)
``trigger``          the concept descriptor alone: ``trigger class_word`` plus, for a sub-class, its folder name
                     (``"fck man, afro, realistic"``)
``alter``            the concept's category templates (``templates/alter/<name>.txt``) with ``{}`` → descriptor
``style``            ``templates/style.txt`` (five painting styles) with ``{}`` → descriptor; not for style concepts
                     unless ``prompts.style_for_styles``
``agnostic``         ``templates/agnostic.txt``: no trigger, no class word (concept leak)
``agnostic_class``   the ``alter`` templates with ``{}`` → the class word alone (no trigger); concepts without a
                     class word get none
===================  ===============================================================================================

Template files are plain UTF-8 text, one template per line; blank lines and lines starting with ``#`` are
skipped. ``{}`` marks where the descriptor goes (every occurrence is filled; other braces are kept as they are).
A folder given as ``prompts.templates`` replaces shipped files of the same relative name; files it lacks come
from the shipped set. The alter template of a concept is chosen by its category: ``prompts.categories[category]``,
else ``alter/<category>.txt`` when such a file exists, else a built-in alias (``people`` → ``character``,
``stuffed_toy`` → ``object``, …), else ``prompts.default_template`` (``generic``).

Expansion (the official code's): a (sub)class gets N images per prompt type. With n prompts, only the first N are
used when n > N; prompt i gets ``N // n`` images plus one more when ``i < N mod n``. Seeds run consecutively from
``generation.seed`` across the prompts of one (sub)class and type, so image k of that set has seed ``seed + k``
and is paired with expanded prompt line k.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from lyco_core.errors import InvalidConfigError, NotFoundError
from lyco_trainer.config import DataConfig
from lyco_trainer.data import Concept, Dataset, discover, full_caption

from .config import EvalConfig, PromptsConfig, PromptType

#: the templates that ship with Lyco
SHIPPED_TEMPLATES = Path(__file__).resolve().parent / "templates"
PLACEHOLDER = "{}"
#: category names (normalised: lower case, '_' for spaces and dashes) → shipped alter template
CATEGORY_ALIASES: dict[str, str] = {
    **dict.fromkeys(
        ("people", "person", "persons", "human", "humans", "man", "woman", "character", "characters", "anime",
         "celebrity", "face", "faces", "portrait"),
        "character",
    ),
    **dict.fromkeys(
        ("stuffed_toy", "stuffed_toys", "toy", "toys", "plushie", "plushies", "object", "objects", "item", "items",
         "product", "products", "animal", "animals", "pet", "pets"),
        "object",
    ),
    **dict.fromkeys(
        ("scene", "scenes", "place", "places", "building", "buildings", "castle", "castles", "landscape",
         "landscapes", "location", "locations", "architecture"),
        "scene",
    ),
    **dict.fromkeys(("style", "styles", "art_style", "art_styles", "artstyle", "artist", "artists"), "style"),
}


class PromptSpec(BaseModel):
    """One prompt line and the images it gets.

    ``index``: the prompt's position in its (concept, prompt_type) list; ``first_image``: the position of its first
    image in that set's N images (image ``first_image + j`` has seed ``seeds[j]``). ``template``: the template line
    the text was made from (None for ``train`` and ``trigger``). ``clip_text``: the text used for CLIP text
    similarity (the trigger replaced by ``prompts.text_map`` or removed; see :func:`text_for_similarity`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    concept: str
    category: str | None
    class_name: str
    subclass: str | None
    prompt_type: PromptType
    text: str
    seeds: list[int]
    n_images: int
    index: int
    first_image: int
    template: str | None = None
    clip_text: str


# --------------------------------------------------------------------------------------------- templates
def template_path(relative: str, folder: Path | None = None) -> Path:
    """The file for ``relative`` (e.g. ``"alter/object.txt"``): in ``folder`` when it has it, else shipped."""
    if folder is not None:
        user = Path(folder) / relative
        if user.is_file():
            return user
    shipped = SHIPPED_TEMPLATES / relative
    if shipped.is_file():
        return shipped
    where = f"{folder} nor the shipped templates" if folder is not None else "the shipped templates"
    raise NotFoundError(f"template file {relative!r}: not in {where}")


def read_templates(path: Path, *, placeholder: bool) -> list[str]:
    """The template lines of ``path``; ``placeholder``: every line must contain ``{}`` (else none may)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidConfigError(f"{path}: cannot read the template file ({type(e).__name__}: {e})") from None
    lines: list[str] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = " ".join(raw.split())
        if not line or line.startswith("#"):
            continue
        if placeholder and PLACEHOLDER not in line:
            raise InvalidConfigError(f"{path}:{n}: template has no {PLACEHOLDER} for the concept descriptor")
        if not placeholder and PLACEHOLDER in line:
            raise InvalidConfigError(f"{path}:{n}: concept-agnostic prompt must not contain {PLACEHOLDER}")
        lines.append(line)
    if not lines:
        raise InvalidConfigError(f"{path}: no templates (one per line; '#' starts a comment)")
    return lines


def _normalise(category: str) -> str:
    return re.sub(r"[\s\-]+", "_", category.strip().lower())


def alter_template_name(category: str | None, cfg: PromptsConfig) -> str:
    """The alter template (file stem under ``alter/``) for a concept category; see the module doc for the order."""
    if category is None:
        return cfg.default_template
    if category in cfg.categories:
        return cfg.categories[category]
    for name in (category, _normalise(category)):
        if cfg.templates is not None and (Path(cfg.templates) / "alter" / f"{name}.txt").is_file():
            return name
        if (SHIPPED_TEMPLATES / "alter" / f"{name}.txt").is_file():
            return name
    return CATEGORY_ALIASES.get(_normalise(category), cfg.default_template)


def fill(template: str, descriptor: str) -> str:
    """``template`` with every ``{}`` replaced by ``descriptor`` (str.format is not used: other braces stay)."""
    return " ".join(template.replace(PLACEHOLDER, descriptor).split())


# --------------------------------------------------------------------------------------------- descriptors
def trigger_text(concept: Concept, cfg: PromptsConfig) -> str:
    """The ``<trigger>`` prompt: the descriptor ``trigger class_word`` and, for a sub-class, its folder name(s)
    (``"a/b"`` → ``"a, b"``) unless the descriptor already holds them. Falls back to the class name when the
    concept has neither a trigger nor a class word."""
    text = concept.descriptor or concept.class_name
    if cfg.subclass_in_trigger and concept.subclass:
        sub = ", ".join(p.strip() for p in concept.subclass.split("/") if p.strip())
        if sub and not _contains(text, sub):
            text = f"{text}, {sub}"
    return text


def _contains(text: str, phrase: str) -> bool:
    return re.search(_phrase_pattern(phrase), text, flags=re.IGNORECASE) is not None


def _phrase_pattern(phrase: str) -> str:
    # token-aware: the phrase must not be part of a longer word (``lun`` does not hit ``lunch``)
    return r"(?<!\w)" + r"\s+".join(re.escape(w) for w in phrase.split()) + r"(?!\w)"


def text_for_similarity(text: str, concept: Concept, cfg: PromptsConfig, *, is_style: bool = False) -> str:
    """The prompt as CLIP text similarity reads it (paper; official ``encode_text_features.py``, made token-aware).

    1. Each ``prompts.text_map`` phrase is replaced by its value (longest phrases first), whole words only and
       case-insensitively; the concept's trigger, when not mapped, is removed. For style concepts the whole
       descriptor (``"veli style"``) is removed, as the official mapping does.
    2. Spaces and commas are stripped at both ends, a leading ``of`` is dropped (``"veli style of a city"`` →
       ``"a city"``), whitespace runs collapse, and empty comma-separated items are dropped.
    """
    mapping: dict[str, str] = dict(cfg.text_map)
    if is_style and concept.descriptor and concept.descriptor not in mapping:
        mapping[concept.descriptor] = ""
    if concept.trigger and concept.trigger not in mapping:
        mapping[concept.trigger] = ""
    out = text
    for phrase in sorted(mapping, key=lambda p: (-len(p), p)):
        if phrase.strip():
            out = re.sub(_phrase_pattern(phrase), mapping[phrase], out, flags=re.IGNORECASE)
    out = " ".join(out.split())
    out = re.sub(r"\s*,(\s*,)+\s*", ", ", out)
    out = re.sub(r"\s+,", ",", out)
    out = out.strip(" ,")
    out = re.sub(r"^of\s+", "", out, flags=re.IGNORECASE)
    return out.strip(" ,")


# --------------------------------------------------------------------------------------------- expansion
def expand_counts(n_prompts: int, n_images: int) -> list[int]:
    """Images per prompt: the first ``min(n_prompts, N)`` prompts, ``N // n`` each, the first ``N mod n`` one more."""
    if n_images < 1:
        raise InvalidConfigError(f"prompts.n_images: must be >= 1, got {n_images}")
    n = min(n_prompts, n_images)
    if n == 0:
        return []
    q, r = divmod(n_images, n)
    return [q + (1 if i < r else 0) for i in range(n)]


def expand(texts: Sequence[str], n_images: int, seed: int) -> list[tuple[str, list[int]]]:
    """``[(text, seeds)]``: :func:`expand_counts` images per prompt, seeds consecutive from ``seed``."""
    out: list[tuple[str, list[int]]] = []
    s = seed
    for text, count in zip(texts, expand_counts(len(texts), n_images)):
        out.append((text, list(range(s, s + count))))
        s += count
    return out


# --------------------------------------------------------------------------------------------- building
def _texts_for(
    ptype: PromptType,
    concept: Concept,
    captions: list[str],
    cfg: PromptsConfig,
    template_cache: dict[str, list[str]],
) -> list[tuple[str, str | None]]:
    """(prompt, template or None) for one concept and prompt type, before expansion."""

    def templates(relative: str, placeholder: bool = True) -> list[str]:
        if relative not in template_cache:
            template_cache[relative] = read_templates(template_path(relative, cfg.templates), placeholder=placeholder)
        return template_cache[relative]

    alter_name = alter_template_name(concept.category, cfg)
    descriptor = trigger_text(concept, cfg)
    if ptype == "train":
        return [(c, None) for c in captions]
    if ptype == "trigger":
        return [(descriptor, None)]
    if ptype == "alter":
        return [(fill(t, descriptor), t) for t in templates(f"alter/{alter_name}.txt")]
    if ptype == "style":
        if alter_name == "style" and not cfg.style_for_styles:
            return []
        return [(fill(t, descriptor), t) for t in templates("style.txt")]
    if ptype == "agnostic":
        return [(t, t) for t in templates("agnostic.txt", placeholder=False)]
    # agnostic_class: the class word in the concept's alter templates, no trigger
    if not concept.class_word:
        return []
    return [(fill(t, concept.class_word), t) for t in templates(f"alter/{alter_name}.txt")]


def _concepts_and_captions(
    source: Dataset | DataConfig | Sequence[Concept], data_cfg: DataConfig, need_captions: bool
) -> tuple[list[Concept], dict[str, list[str]]]:
    if isinstance(source, DataConfig):
        data_cfg, source = source, discover(source)
    if isinstance(source, Dataset):
        return list(source.concepts), _captions(source, data_cfg)
    if need_captions:
        raise InvalidConfigError(
            "prompts.types: 'train' needs the dataset's captions; pass a discovered Dataset or the DataConfig"
        )
    return list(source), {}


def _captions(ds: Dataset, data_cfg: DataConfig) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {c.name: [] for c in ds.concepts}
    for item in ds.items:
        out.setdefault(item.concept.name, []).append(full_caption(item, data_cfg))
    return out


def build_prompts(source: Dataset | DataConfig | Sequence[Concept], cfg: EvalConfig) -> list[PromptSpec]:
    """Every prompt of every concept, expanded to ``cfg.prompts.n_images`` images per (sub)class and type.

    ``source``: a discovered :class:`lyco_trainer.data.Dataset` (its captions are built with ``cfg.data``'s
    prefix/suffix), a ``DataConfig`` (discovered here), or concepts alone (then ``train`` prompts are an error).
    Order: concepts as the dataset lists them, then ``cfg.prompts.types`` in order, then prompt lines.
    """
    pcfg = cfg.prompts
    concepts, captions = _concepts_and_captions(source, cfg.data, "train" in pcfg.types)
    cache: dict[str, list[str]] = {}
    out: list[PromptSpec] = []
    for concept in concepts:
        is_style = alter_template_name(concept.category, pcfg) == "style"
        for ptype in dict.fromkeys(pcfg.types):
            pairs = _texts_for(ptype, concept, captions.get(concept.name, []), pcfg, cache)
            first = 0
            for i, (text, seeds) in enumerate(expand([t for t, _ in pairs], pcfg.n_images, cfg.generation.seed)):
                out.append(
                    PromptSpec(
                        concept=concept.name,
                        category=concept.category,
                        class_name=concept.class_name,
                        subclass=concept.subclass,
                        prompt_type=ptype,
                        text=text,
                        seeds=seeds,
                        n_images=len(seeds),
                        index=i,
                        first_image=first,
                        template=pairs[i][1],
                        clip_text=text_for_similarity(text, concept, pcfg, is_style=is_style),
                    )
                )
                first += len(seeds)
    return out


def prompt_table(prompts: Sequence[PromptSpec]) -> list[dict[str, Any]]:
    """One row per image (concept, prompt_type, image index, seed, prompt, clip_text): the expanded prompt list."""
    rows: list[dict[str, Any]] = []
    for p in prompts:
        for j, seed in enumerate(p.seeds):
            rows.append({"concept": p.concept, "prompt_type": p.prompt_type, "image": p.first_image + j,
                         "seed": seed, "prompt": p.text, "clip_text": p.clip_text})
    return rows
