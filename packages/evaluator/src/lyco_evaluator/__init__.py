"""The LyCORIS paper's evaluation framework (issue: evaluator).

Skeleton only: this package is filled in by its own issue. It installs so that the monorepo layout and
the `lyco` command's plug-in mechanism are in place.
"""
