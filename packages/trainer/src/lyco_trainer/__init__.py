"""lyco_trainer: fine-tune SD 1.x / 2.x / SDXL with any Lyco adapter algorithm (``lyco train CONFIG.toml``).

Modules: :mod:`.config` (the TOML config), :mod:`.data` (concept folders, captions, balancing, buckets),
:mod:`.models` (loading bases, latent/text caches), :mod:`.optim` (optimisers, schedules, noise and losses),
:mod:`.loop` (the training loop, progress callbacks, cancel/resume state), :mod:`.sampling` (sample images),
:mod:`.cli` (``lyco train``).
"""
