"""What an operation did, per module: the result every ``lyco adapter`` operation returns.

The CLI prints it, ``--json`` dumps it, and the REST service returns it, so it is a pydantic model.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModuleReport(BaseModel):
    """One module of the output."""

    algo: str | None = Field(None, description="algorithm of the output module")
    rank: int | None = Field(None, description="rank of the output module, when it has one")
    rel_error: float | None = Field(
        None, description="‖ΔW_out − ΔW_exact‖_F / ‖ΔW_exact‖_F when the operation approximates; None when exact"
    )
    note: str | None = None


class OpReport(BaseModel):
    """The output file and what happened to each module."""

    operation: str
    output: str | None = Field(None, description="path written (None for read-only operations)")
    modules: dict[str, ModuleReport] = Field(default_factory=dict, description="output module key → report")
    dropped: dict[str, str] = Field(default_factory=dict, description="input key → why it is not in the output")
    warnings: list[str] = Field(default_factory=list)

    def max_rel_error(self) -> float | None:
        errs = [m.rel_error for m in self.modules.values() if m.rel_error is not None]
        return max(errs) if errs else None

    def summary_lines(self) -> list[str]:
        """A short human-readable account (the CLI prints it)."""
        lines = [f"{self.operation}: {len(self.modules)} module(s)" + (f" → {self.output}" if self.output else "")]
        worst = self.max_rel_error()
        if worst is not None:
            errs = sorted((m.rel_error or 0.0, k) for k, m in self.modules.items() if m.rel_error is not None)
            mean = sum(e for e, _ in errs) / len(errs)
            lines.append(f"  relative error per module: mean {mean:.3e}, max {worst:.3e} ({errs[-1][1]})")
        if self.dropped:
            lines.append(f"  dropped {len(self.dropped)} module(s):")
            lines += [f"    {k}: {why}" for k, why in sorted(self.dropped.items())[:20]]
            if len(self.dropped) > 20:
                lines.append(f"    … and {len(self.dropped) - 20} more (see --json)")
        lines += [f"  warning: {w}" for w in self.warnings]
        return lines
