"""Celery GPU/CPU workers for Lyco jobs (issue: service).

Skeleton only: this package is filled in by its own issue. It installs so that the monorepo layout and
the `lyco` command's plug-in mechanism are in place.
"""
