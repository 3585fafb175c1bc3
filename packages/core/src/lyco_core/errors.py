"""Lyco's typed errors.

Every error a user can cause derives from :class:`LycoError`. Its message is one line that names the
file, key or field at fault; the CLI prints it and exits non-zero, the API maps it to an HTTP status.
"""

from __future__ import annotations


class LycoError(Exception):
    """Base class of every error Lyco raises on purpose."""

    exit_code: int = 2


class InvalidConfigError(LycoError, ValueError):
    """A configuration, preset or option is invalid (unknown key, bad value, empty selection)."""


class UnknownFormatError(LycoError, ValueError):
    """A file or key layout that Lyco does not recognise."""


class UnsupportedLayerError(LycoError, TypeError):
    """An algorithm was asked to wrap a layer kind it does not support."""


class IncompatibleBaseError(LycoError, ValueError):
    """An adapter does not fit the base model it is applied to."""

    exit_code = 1


class CorruptFileError(LycoError, ValueError):
    """A file is truncated, malformed, or holds tensors that break the format's rules."""


class NotFoundError(LycoError, FileNotFoundError):
    """A file, key or module that was asked for does not exist."""


class FileExistsLycoError(LycoError, FileExistsError):
    """An output exists already and overwriting was not asked for."""
