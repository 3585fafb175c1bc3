"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# LyCORIS 4.x picks fused kernels when it can; the reference forward must be its eager torch path.
os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")


# Tests run tiny models: one intra-op thread is faster than two fighting over a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
