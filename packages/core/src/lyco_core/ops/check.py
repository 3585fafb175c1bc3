"""Check: does an adapter file fit a base model? Which modules load, which keys match nothing, which shapes differ."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from ..checkpoint import open_base
from ..errors import IncompatibleBaseError
from ..files import read_adapter
from .family import FamilyVerdict, adapter_family


class CheckReport(BaseModel):
    """The verdict of :func:`check_adapter`; ``fits`` is False when anything does not load."""

    file: str
    base: str
    fits: bool
    reason: str | None = Field(None, description="why the file does not fit (None when it fits)")
    base_family: str
    base_evidence: list[str]
    adapter_family: FamilyVerdict
    loaded: list[str] = Field(default_factory=list, description="module keys that load into the base")
    unmatched: list[str] = Field(default_factory=list, description="module keys with no layer in the base")
    mismatched: dict[str, str] = Field(default_factory=dict, description="module key → why it does not fit its layer")
    unknown_tensors: list[str] = Field(default_factory=list, description="tensors no algorithm uses (never loaded)")

    def lines(self) -> list[str]:
        """The human-readable report the CLI prints."""
        n = len(self.loaded) + len(self.unmatched) + len(self.mismatched)
        out = [
            f"{self.file} on {self.base}: {'FITS' if self.fits else 'DOES NOT FIT'}"
            + (f" ({self.reason})" if self.reason else ""),
            f"  base family     {self.base_family}   ({'; '.join(self.base_evidence) or 'no evidence'})",
            f"  adapter family  {self.adapter_family.family}   ({'; '.join(self.adapter_family.evidence[:3])})",
            f"  modules         {len(self.loaded)}/{n} load",
        ]
        if self.unmatched:
            out.append(f"  no such layer   {len(self.unmatched)}:")
            out += [f"    {k}" for k in self.unmatched[:20]]
            if len(self.unmatched) > 20:
                out.append(f"    … and {len(self.unmatched) - 20} more (see --json)")
        for why in list(self.mismatched.values())[:20]:
            out.append(f"  shape mismatch  {why}")
        if self.unknown_tensors:
            out.append(f"  unknown keys    {len(self.unknown_tensors)}: {', '.join(self.unknown_tensors[:5])}")
        return out


def check_adapter(path: str | Path, base_path: str | Path) -> CheckReport:
    """Load nothing, compute nothing: resolve each module's key in the base and compare shapes."""
    adapter = read_adapter(path)
    verdict = adapter_family(adapter)
    with open_base(base_path) as base:
        loaded: list[str] = []
        unmatched: list[str] = []
        mismatched: dict[str, str] = {}
        for key, module in adapter.modules.items():
            canonical = base.resolve(key)
            if canonical is None:
                unmatched.append(key)
                continue
            target = base.targets[canonical]
            try:
                module.check_fits(target.shape, target.bias is not None)
            except IncompatibleBaseError as e:
                mismatched[key] = str(e)
                continue
            loaded.append(key)
        reason = None
        if verdict.family != "unknown" and base.family != "unknown" and verdict.family != base.family:
            reason = f"the adapter is for {verdict.family}, the base is {base.family}"
        elif unmatched or mismatched:
            reason = f"{len(unmatched) + len(mismatched)} of {len(adapter.modules)} modules do not load"
        elif not adapter.modules:
            reason = "the file holds no adapter modules"
        return CheckReport(
            file=str(path),
            base=str(base_path),
            fits=reason is None,
            reason=reason,
            base_family=base.family,
            base_evidence=base.evidence,
            adapter_family=verdict,
            loaded=loaded,
            unmatched=unmatched,
            mismatched=mismatched,
            unknown_tensors=adapter.unknown_tensors,
        )
