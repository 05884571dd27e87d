"""Baselines that natkit is measured against, all on heads-last ``[B, *spatial, heads, dim]``.

- ``window_attention``: Swin-style window self-attention (WSA): SDPA over
  non-overlapping windows of ``kernel_size`` tokens, the partition and reverse copies
  included, optional relative positional bias as an additive mask.
- ``full_attention``: SDPA over all tokens (flash/cuDNN on GPU).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``[B, *spatial, H, D]`` -> ``[B * windows, H, prod(window), D]`` (pads to a multiple)."""
    b, *spatial, h, d = x.shape
    pads = [(-s) % w for s, w in zip(spatial, window)]
    if any(pads):
        widths = []
        for pad in reversed(pads):
            widths += [0, pad]
        x = F.pad(x, [0, 0, 0, 0] + widths)
    grid = [(s + p) // w for s, p, w in zip(spatial, pads, window)]
    shape = [b]
    for g, w in zip(grid, window):
        shape += [g, w]
    x = x.reshape(*shape, h, d)
    nd = len(window)
    outer = [1 + 2 * i for i in range(nd)]
    inner = [2 + 2 * i for i in range(nd)]
    x = x.permute(0, *outer, 2 * nd + 1, *inner, 2 * nd + 2)
    return x.reshape(-1, h, math.prod(window), d)


def window_reverse(x: torch.Tensor, window: Sequence[int], spatial: Sequence[int],
                   batch: int) -> torch.Tensor:
    """Inverse of ``window_partition``: back to ``[B, *spatial, H, D]`` (crops the padding)."""
    nd = len(window)
    _, h, _, d = x.shape
    grid = [-(-s // w) for s, w in zip(spatial, window)]
    x = x.reshape(batch, *grid, h, *window, d)
    perm = [0]
    for i in range(nd):
        perm += [1 + i, nd + 2 + i]
    x = x.permute(*perm, nd + 1, 2 * nd + 2)
    x = x.reshape(batch, *(g * w for g, w in zip(grid, window)), h, d)
    return x[(slice(None), *(slice(0, s) for s in spatial))]


def relative_bias_table(rpb: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Swin's ``[H, W, W]`` window bias (``W = prod(window)``) from a ``[H, 2w-1, ...]`` table."""
    index = []
    nd = len(window)
    for i, w in enumerate(window):
        pos = torch.arange(w, device=rpb.device)
        rel = pos[None, :] - pos[:, None] + w - 1
        shape = [1] * (2 * nd)
        shape[i], shape[nd + i] = w, w
        index.append(rel.view(shape))
    n = math.prod(window)
    return rpb[(slice(None), *index)].reshape(rpb.shape[0], n, n)


def window_attention(q, k, v, kernel_size: Sequence[int], bias: Optional[torch.Tensor] = None):
    """Swin WSA on heads-last tensors; ``bias`` is a ``[H, W, W]`` table from
    ``relative_bias_table`` (computed once, as Swin does)."""
    b, *spatial, _, _ = q.shape
    qw, kw, vw = (window_partition(t, kernel_size) for t in (q, k, v))
    mask = None if bias is None else bias.to(q.dtype)
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask)
    return window_reverse(out, kernel_size, spatial, b)


def full_attention(q, k, v):
    """SDPA over all tokens of heads-last tensors."""
    b, *spatial, h, d = q.shape
    flat = [t.reshape(b, -1, t.shape[-2], d).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*flat, enable_gqa=flat[1].shape[1] != h)
    return out.transpose(1, 2).reshape(q.shape)
