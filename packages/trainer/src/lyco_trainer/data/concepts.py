"""Concept folders (paper §5.1): where the images are, what each concept is called, and which files are bad.

A *concept* is one folder that directly contains images. It comes from one of two places:

- ``data.root``: every folder under it (the root included) that directly holds images is a concept. Its path
  below the root gives the paper's hierarchy ``category/class[/sub-class]``:

  ============================  ===========  ========  ==================
  folder below the root         category     class     sub-class
  ============================  ===========  ========  ==================
  ``.`` (images in the root)    —            root name —
  ``frieren``                   —            frieren   —
  ``anime/frieren``             anime        frieren   —
  ``anime/frieren/casual``      anime        frieren   casual
  ``a/b/c/d``                   a            b         ``c/d``
  ============================  ===========  ========  ==================

- ``[[data.concepts]]``: explicit folders (``path``, ``trigger``, ``class_word``, ``repeats``). A folder that is
  also found under ``data.root`` keeps its hierarchy and takes the explicit settings.

Descriptor ``[V] = trigger [class_word]``. The trigger defaults to the folder name; the class word to none.
Folder names in sd-scripts' (kohya) form ``<repeats>_<trigger> [class word]`` are understood: ``10_sks dog``
means repeats 10, trigger ``sks``, class word ``dog`` (and ``sks dog`` is the name in the hierarchy).

An optional ``concept.toml`` in a concept folder sets any of::

    trigger = "frieren"     # "" for no trigger (e.g. a style learned from tags only)
    class_word = "girl"
    repeats = 2             # integer >= 1

Precedence: ``[[data.concepts]]`` fields that are set > ``concept.toml`` > the folder name.

Bad files are skipped, never fatal: files whose extension is not an image's, files that cannot be read, and
images that do not decode (truncated, corrupt, a text file named ``.png``) are listed with their reason; so
are caption files with no image beside them.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from lyco_core.errors import InvalidConfigError, NotFoundError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
CONCEPT_FILE = "concept.toml"
_KOHYA_NAME = re.compile(r"^([1-9]\d*)_(.+)$")
_CONCEPT_KEYS = {"trigger": str, "class_word": str, "repeats": int}
# EXIF orientations that rotate the image by 90°/270° (width and height swap once transposed).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class Concept:
    """One concept folder and its descriptor.

    ``name`` is unique within a dataset (the folder path below ``data.root``, posix-style, or the folder name for
    an explicit concept). ``repeats`` is the user's per-concept multiplier (>= 1).
    """

    name: str
    path: Path
    category: str | None
    class_name: str
    subclass: str | None
    trigger: str
    class_word: str | None
    repeats: int = 1

    @property
    def descriptor(self) -> str:
        """The concept descriptor ``[V]``: ``"trigger class_word"`` (either part may be absent)."""
        return " ".join(p for p in (self.trigger, self.class_word) if p)


@dataclass(frozen=True)
class ImageItem:
    """One usable training image.

    ``size`` is (width, height) in pixels as the image is shown, i.e. after its EXIF orientation is applied.
    ``caption`` is the text of the same-name caption file (whitespace-normalised; ``""`` for an empty file) or
    None when there is no caption file.
    """

    path: Path
    caption: str | None
    concept: Concept
    size: tuple[int, int]


class SkippedFile(BaseModel):
    """A file that was left out of the dataset. ``kind``: not-image | unreadable | corrupt | orphan-caption."""

    path: str
    kind: str
    reason: str


def parse_folder_name(name: str) -> tuple[int | None, str, str | None, str]:
    """``"10_sks dog"`` → (10, "sks", "dog", "sks dog"); ``"frieren"`` → (None, "frieren", None, "frieren").

    Returns (repeats or None, trigger, class word or None, display name). Only the kohya form is split into
    trigger and class word (first word / the rest); a plain name is the trigger as a whole.
    """
    m = _KOHYA_NAME.match(name)
    if m is None or not m.group(2).strip():
        return None, name, None, name
    rest = m.group(2).strip()
    words = rest.split()
    return int(m.group(1)), words[0], (" ".join(words[1:]) or None), rest


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def probe_image(path: Path) -> tuple[tuple[int, int] | None, SkippedFile | None]:
    """Check that ``path`` decodes as an image; returns ((width, height), None) or (None, why it was skipped).

    PNG/GIF/TIFF are checked by PIL's ``verify`` (chunk CRCs, truncation) without decoding pixels; JPEG and WebP,
    for which ``verify`` checks nothing, are decoded (JPEG at 1/8 scale through ``draft``, which still reads
    the whole stream), so a truncated file is caught here rather than during training.
    """
    try:
        if path.stat().st_size == 0:
            return None, SkippedFile(path=str(path), kind="corrupt", reason="empty file")
        with Image.open(path) as im:
            fmt = im.format
            size = im.size
            if fmt in ("JPEG", "MPO", "WEBP", "BMP"):
                orientation = im.getexif().get(0x0112, 1)
                if fmt in ("JPEG", "MPO"):
                    im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
            else:
                im.verify()  # must come first after open; the EXIF is read from a second open below
        if fmt not in ("JPEG", "MPO", "WEBP", "BMP"):
            with Image.open(path) as im:
                orientation = im.getexif().get(0x0112, 1)
    except UnidentifiedImageError as e:
        return None, SkippedFile(path=str(path), kind="corrupt", reason=f"not a readable image ({_first_line(e)})")
    except OSError as e:
        if isinstance(e, (PermissionError, FileNotFoundError, IsADirectoryError)):
            return None, SkippedFile(path=str(path), kind="unreadable", reason=_first_line(e))
        return None, SkippedFile(path=str(path), kind="corrupt", reason=_first_line(e))
    except Exception as e:  # PIL raises many types on malformed data (SyntaxError, ValueError, DecompressionBomb…)
        return None, SkippedFile(path=str(path), kind="corrupt", reason=_first_line(e))
    if orientation in _SWAPPING_ORIENTATIONS:
        size = (size[1], size[0])
    return size, None


def read_caption(path: Path) -> tuple[str | None, str | None]:
    """The caption text of ``path`` (all whitespace runs, newlines included, become one space) or None; plus a warning.

    UTF-8 (with or without BOM) is expected; other bytes are read as Latin-1 rather than dropping the caption.
    """
    if not path.is_file():
        return None, None
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, f"{path}: caption not readable ({_first_line(e)}); using the descriptor alone"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return " ".join(text.split()), None


def _load_concept_file(folder: Path) -> dict[str, Any]:
    path = folder / CONCEPT_FILE
    if not path.is_file():
        return {}
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidConfigError(f"{path}: not valid TOML ({_first_line(e)})") from None
    for key, value in doc.items():
        want = _CONCEPT_KEYS.get(key)
        if want is None:
            raise InvalidConfigError(f"{path}: unknown key {key!r} (known: trigger, class_word, repeats)")
        if not isinstance(value, want) or isinstance(value, bool):
            raise InvalidConfigError(f"{path}: {key} must be a {want.__name__}, got {value!r}")
    if "repeats" in doc and doc["repeats"] < 1:
        raise InvalidConfigError(f"{path}: repeats must be >= 1, got {doc['repeats']}")
    return doc


def _hierarchy(parts: list[str], root_name: str) -> tuple[str | None, str, str | None]:
    if not parts:
        return None, root_name, None
    if len(parts) == 1:
        return None, parts[0], None
    if len(parts) == 2:
        return parts[0], parts[1], None
    return parts[0], parts[1], "/".join(parts[2:])


def make_concept(
    folder: Path,
    *,
    name: str,
    parts: list[str] | None,
    overrides: dict[str, Any] | None = None,
) -> Concept:
    """Build a concept for ``folder``: folder name < ``concept.toml`` < ``overrides`` (explicit config fields).

    ``parts`` is the folder's path below ``data.root`` (None for an explicit folder outside the root).
    """
    leaf_repeats, trigger, class_word, display = parse_folder_name(folder.name)
    if parts is None:
        category, class_name, subclass = None, display, None
    else:
        category, class_name, subclass = _hierarchy([parse_folder_name(p)[3] for p in parts], display)
    settings: dict[str, Any] = {"trigger": trigger, "class_word": class_word, "repeats": leaf_repeats or 1}
    settings.update(_load_concept_file(folder))
    settings.update(overrides or {})
    return Concept(
        name=name,
        path=folder,
        category=category,
        class_name=class_name,
        subclass=subclass,
        trigger=settings["trigger"] if settings["trigger"] is not None else display,
        class_word=settings["class_word"] or None,
        repeats=int(settings["repeats"]),
    )


@dataclass
class FolderScan:
    """What one concept folder holds: image candidates (sorted by name), caption files by stem, skipped files."""

    images: list[Path]
    captions: dict[str, Path]
    skipped: list[SkippedFile]


def scan_folder(folder: Path, caption_extension: str) -> FolderScan:
    """Classify the files directly in ``folder`` (hidden files, sub-folders and ``concept.toml`` are ignored).

    Extensions compare case-insensitively; ``caption_extension`` may be given with or without its dot.
    """
    images: list[Path] = []
    skipped: list[SkippedFile] = []
    captions: dict[str, Path] = {}
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        return FolderScan([], {}, [SkippedFile(path=str(folder), kind="unreadable", reason=_first_line(e))])
    cap_ext = "." + caption_extension.lower().lstrip(".")
    for p in entries:
        if p.name.startswith(".") or p.name == CONCEPT_FILE or p.is_dir():
            continue
        ext = p.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            images.append(p)
        elif ext == cap_ext:
            captions[p.stem] = p
        else:
            why = f"not an image file ({ext or 'no extension'})"
            skipped.append(SkippedFile(path=str(p), kind="not-image", reason=why))
    stems = {p.stem for p in images}
    for stem, c in captions.items():
        if stem not in stems:
            skipped.append(SkippedFile(path=str(c), kind="orphan-caption", reason="caption file without an image"))
    return FolderScan(images, captions, skipped)


def folders_with_images(root: Path) -> list[Path]:
    """Every folder under ``root`` (itself included, hidden folders excluded) directly holding an image file."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith(".") for f in filenames):
            found.append(Path(dirpath))
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def check_folder(path: Path, key: str) -> None:
    """Raise a one-line error naming ``key`` when ``path`` is missing or not a folder."""
    if not path.exists():
        raise NotFoundError(f"{key}: no such folder: {path}")
    if not path.is_dir():
        raise InvalidConfigError(f"{key}: not a folder: {path}")
