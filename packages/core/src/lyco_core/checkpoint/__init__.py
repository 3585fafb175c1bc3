"""Base models on disk (diffusers folders, diffusers state dicts, LDM single files) as adapter operations see them.

:func:`open_base` gives a :class:`BaseCheckpoint`: every adaptable layer under the kohya/LyCORIS key a file uses
for it (aliases resolved), its weight read from disk on demand, and the base's family with the evidence.
"""

from .base import BaseCheckpoint, detect_family, open_base
from .components import Component, Target
from .sources import TensorSource

__all__ = ["BaseCheckpoint", "Component", "Target", "TensorSource", "detect_family", "open_base"]
