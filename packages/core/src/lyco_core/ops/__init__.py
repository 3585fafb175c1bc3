"""Operations on adapter files, one module each; ``lyco adapter <op>`` and the REST service call these.

* :mod:`.bake` — merge adapters into a base checkpoint (diffusers folder / state dict / LDM single file).
* :mod:`.merge` — one adapter equal to Σ wᵢ·ΔWᵢ (exact, or SVD re-ranked).
* :mod:`.rescale` — fold a multiplier into the file, or change α keeping ΔW.
* :mod:`.resize` — SVD re-rank to LoRA (fixed or dynamic rank).
* :mod:`.convert` — between ecosystems (kohya/LyCORIS, PEFT, diffusers, ComfyUI), namings, algorithms, bases.
* :mod:`.extract` — a LoRA/LoCon from the difference of two checkpoints.
* :mod:`.check` — does a file fit a base model.
* :mod:`.lowrank` — the SVD and rank-selection rules the above share.
* :mod:`.report` — :class:`~.report.OpReport`, what every operation returns.
"""
