"""FastAPI team server for Lyco jobs and adapter files (issue: service).

Skeleton only: this package is filled in by its own issue. It installs so that the monorepo layout and
the `lyco` command's plug-in mechanism are in place.
"""
