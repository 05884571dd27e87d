"""The neighborhood of every query, per dimension: the SPEC formula in one place.

Every backend derives which keys a query attends from these functions, so the
semantics live here once. Per dimension a query ``i`` attends the keys
``first[i] + dilation * t`` for ``t < count[i]`` (``count == kernel`` unless causal).
"""

from __future__ import annotations

import torch


def window_1d(length: int, kernel: int, stride: int, dilation: int, causal: bool,
              device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(first_key, count, query_group_pos)``, each ``int64[length]``.

    ``first_key`` is the index of the first attended key in the original
    (undilated) coordinates, ``count`` how many keys of the dilation group follow
    it, ``query_group_pos`` is ``i div dilation`` (used for relative positions).
    """
    i = torch.arange(length, device=device)
    group = i % dilation
    pos = i // dilation
    group_len = (length - group + dilation - 1) // dilation
    block = (pos // stride) * stride
    if causal:
        leader = torch.minimum(block + stride - 1, group_len - 1)
        start = (leader - kernel + 1).clamp_min(0)
        count = pos + 1 - start
    else:
        leader = torch.minimum(block + stride // 2, group_len - 1)
        start = torch.maximum(torch.minimum(leader - kernel // 2, group_len - kernel),
                              torch.zeros_like(leader))
        count = torch.full_like(pos, kernel)
    return start * dilation + group, count, pos


def group_window(pos: int, group_len: int, kernel: int, stride: int, causal: bool) -> tuple[int, int]:
    """``window_1d`` for one query, in plain ints and dilation-group coordinates: the
    ``[start', end')`` of group position ``pos`` in a group of ``group_len`` (for shapes
    decided while tracing, where tensor values are unknown)."""
    block = (pos // stride) * stride
    if causal:
        leader = min(block + stride - 1, group_len - 1)
        return max(leader - kernel + 1, 0), pos + 1
    leader = min(block + stride // 2, group_len - 1)
    start = max(min(leader - kernel // 2, group_len - kernel), 0)
    return start, start + kernel


def dense_mask_1d(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                  device=None) -> torch.Tensor:
    """``bool[length, length]``: ``mask[i, j]`` iff query ``i`` attends key ``j`` in this dimension."""
    first, count, _ = window_1d(length, kernel, stride, dilation, causal, device)
    j = torch.arange(length, device=device)
    offset = j[None, :] - first[:, None]
    return (offset >= 0) & (offset % dilation == 0) & (offset // dilation < count[:, None])
