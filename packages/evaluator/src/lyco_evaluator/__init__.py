"""The LyCORIS paper's evaluation framework (arXiv 2309.14859): prompts, generation, metrics, reports.

``lyco eval CONFIG.toml`` or, from Python::

    from lyco_evaluator import evaluate, load_config
    result = evaluate(load_config("eval.toml", ["generation.steps=20"]))
    print("\\n".join(result.summary_lines()))     # criterion scores per checkpoint; report.html in cfg.output.dir

Modules: :mod:`.config` (``EvalConfig``), :mod:`.prompts` (prompt types and templates), :mod:`.generate`
(images per checkpoint and the base, cached), :mod:`.encoders` (DINOv2 / CLIP / VGG19 from local weights, feature
cache), :mod:`.metrics` (pure metric functions), :mod:`.aggregate` (normalized ranks, hierarchy, Table 1, SHAP),
:mod:`.report` (CSV / JSON / HTML), :mod:`.runner` (``evaluate``). Importing the package loads none of them (the
``lyco`` command imports it on every start); the names below are resolved on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "evaluate": "runner",
    "EvalResult": "report",
    "EvalConfig": "config",
    "load_config": "config",
    "build_prompts": "prompts",
    "generate": "generate",
    "load_encoder": "encoders",
}

__all__ = ["EvalConfig", "EvalResult", "build_prompts", "evaluate", "generate", "load_config", "load_encoder"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lyco_evaluator' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
