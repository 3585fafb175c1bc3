"""Generation jobs: a base model with adapters at their strengths, one image per prompt × seed.

``params["spec"]`` is a :class:`lyco_api.routes.jobs.GenerateSpec` dump whose ``base`` and adapter ``file`` entries
the API resolved to absolute paths. The base is loaded with :func:`lyco_trainer.models.load_base`, the pipeline is
the evaluator's (:func:`lyco_evaluator.generate.build_pipeline`: DDIM or Euler a, no safety checker) and every
adapter is loaded with :func:`lyco_core.load_network` at its strength and applied on top of the others (adapters
stack, see :mod:`lyco_core.network.module`). Each image uses a CPU generator seeded with its seed, so a (prompt,
seed) pair gives the same image on every run and machine type. Images are written as PNG files in
``<work_dir>/images/`` and registered as ``image`` files with their prompt, seed and index in ``meta``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lyco_core.errors import InvalidConfigError

from . import JobContext, Outcome, Output

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(ctx: JobContext) -> Outcome:
    import torch
    from PIL.PngImagePlugin import PngInfo

    import lyco_core
    from lyco_api.routes.jobs import GenerateSpec
    from lyco_core.formats.safetensors_io import atomic_output
    from lyco_evaluator.generate import build_pipeline, components
    from lyco_trainer.config import ModelConfig
    from lyco_trainer.models import load_base

    raw = ctx.params.get("spec")
    if not isinstance(raw, dict):
        raise InvalidConfigError("params.spec: a generation job needs its spec (a JSON object)")
    spec = GenerateSpec.model_validate(raw)
    device = _device(spec.device)
    dtype_name = spec.dtype if spec.dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32")
    dtype = getattr(torch, _DTYPES[dtype_name])

    ctx.log(f"loading base {spec.base} on {device} ({dtype_name})")
    models = load_base(ModelConfig(base=Path(spec.base)), device=device, dtype=dtype)
    parts = components(models)
    networks = []
    for a in spec.adapters:
        net, _report = lyco_core.load_network(a.file, parts, multiplier=a.strength)
        net.to(device=device, dtype=dtype)
        net.eval()
        net.apply()
        networks.append(net)
        ctx.log(f"adapter {Path(a.file).name} at strength {a.strength}")
    pipe = build_pipeline(models, spec.scheduler)

    out_dir = ctx.work_dir / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    total = len(spec.prompts) * len(spec.seeds)
    ctx.event("start", {"total": total, "message": f"generating {total} image(s)"}, snapshot=True)
    outputs: list[Output] = []
    images: list[dict[str, Any]] = []
    done = 0
    try:
        for pi, prompt in enumerate(spec.prompts):
            for seed in spec.seeds:
                if ctx.should_stop():
                    return Outcome(result={"images": images, "done": done, "total": total}, cancelled=True)
                gen = torch.Generator(device="cpu").manual_seed(seed)
                with torch.no_grad():
                    out = pipe(prompt=prompt, negative_prompt=spec.negative_prompt or None,
                               num_inference_steps=spec.steps, guidance_scale=spec.guidance, width=spec.width,
                               height=spec.height, generator=gen, output_type="pil")
                image = out.images[0]
                path = out_dir / f"{pi:03d}-{seed}.png"
                info = PngInfo()
                info.add_text("parameters", f"{prompt}\nSeed: {seed}, Steps: {spec.steps}, CFG: {spec.guidance}")
                with atomic_output(path, overwrite=True) as tmp:
                    image.save(tmp, format="PNG", pnginfo=info)
                meta = {"prompt": prompt, "seed": seed, "index": done, "width": spec.width, "height": spec.height}
                outputs.append(Output("image", path, path.name, meta, role="image"))
                images.append({"name": path.name, **meta})
                done += 1
                ctx.event("progress", {"done": done, "total": total, "message": f"image {done}/{total}"},
                          snapshot=True)
    finally:
        for net in reversed(networks):
            net.restore()
    return Outcome(result={"images": images, "done": done, "total": total}, outputs=outputs)


__all__ = ["run"]
