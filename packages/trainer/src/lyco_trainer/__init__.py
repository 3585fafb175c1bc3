"""Fine-tuning SD 1.x / 2.x / SDXL with Lyco adapters (issue: trainer).

Skeleton only: this package is filled in by its own issue. It installs so that the monorepo layout and
the `lyco` command's plug-in mechanism are in place.
"""
