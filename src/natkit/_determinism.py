"""PyTorch's deterministic mode, set and restored (``natkit train --deterministic``, the GPU
benchmark and tests).

Under ``torch.use_deterministic_algorithms(True)`` natkit's Triton backend runs its default
configs and sums the rpb gradient without atomics; cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG``
(read when it starts, so before the first matmul), and cuDNN's benchmark mode would pick
algorithms by timing.
"""

from __future__ import annotations

import contextlib
import os

import torch


def set_deterministic(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


@contextlib.contextmanager
def restored():
    """Restores the deterministic mode (and ``warn_only``) and cuDNN's benchmark flag on exit."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


@contextlib.contextmanager
def deterministic(on: bool = True):
    """``set_deterministic(on)`` inside the block, the previous state after it."""
    with restored():
        set_deterministic(on)
        yield
