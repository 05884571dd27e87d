"""FlexAttention baseline: neighborhood attention as a ``BlockMask`` (+ RPB as a ``score_mod``).

Tokens are reordered tile-major (8x16 tiles in 2-D, 4x4x8 in 3-D, 128 in 1-D; the grid
is padded to whole tiles and padded keys are masked) so that each 128-token block of
FlexAttention is a compact spatial tile, the layout in which a neighborhood block mask
is sparsest. ``FlexNA.to_tiled`` / ``from_tiled`` convert heads-last tensors; benchmark
timings of ``FlexNA.__call__`` take tiled inputs (the reorder is not timed).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

TILES = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}


class FlexNA:
    """Non-causal or causal NA with dilation and stride (the SPEC formula) via flex_attention."""

    def __init__(self, spatial: Sequence[int], kernel_size: Sequence[int],
                 dilation: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None,
                 is_causal: Optional[Sequence[bool]] = None, rpb: Optional[torch.Tensor] = None,
                 device="cuda", compile: bool = True):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        nd = len(spatial)
        self.nd, self.spatial = nd, tuple(spatial)
        self.kernel = tuple(kernel_size)
        self.dilation = tuple(dilation or (1,) * nd)
        self.stride = tuple(stride or (1,) * nd)
        self.causal = tuple(is_causal or (False,) * nd)
        self.tile = tuple(min(t, 1 << (s - 1).bit_length()) for t, s in zip(TILES[nd], spatial))
        self.padded = tuple(-(-s // t) * t for s, t in zip(spatial, self.tile))
        self.grid = tuple(p // t for p, t in zip(self.padded, self.tile))
        self.n = math.prod(self.padded)
        self.rpb = rpb

        def coords(idx):
            per_tile = math.prod(self.tile)
            tile_id, r = idx // per_tile, idx % per_tile
            out = []
            for dim in range(nd):
                inner = math.prod(self.tile[dim + 1:])
                outer = math.prod(self.grid[dim + 1:])
                t = (tile_id // outer) % self.grid[dim]
                out.append(t * self.tile[dim] + (r // inner) % self.tile[dim])
            return out

        def window(i, length, k, s, d, causal):
            g, ip = i % d, i // d
            glen = (length - g + d - 1) // d
            blk = (ip // s) * s
            if causal:
                leader = torch.minimum(blk + s - 1, glen - 1)
                start = torch.clamp(leader - k + 1, min=0)
                end = ip + 1
            else:
                leader = torch.minimum(blk + s // 2, glen - 1)
                start = torch.clamp(torch.minimum(leader - k // 2, glen - k), min=0)
                end = start + k
            return g, start, end

        def mask_mod(b, h, q_idx, kv_idx):
            ok = q_idx >= 0
            for dim, (i, j) in enumerate(zip(coords(q_idx), coords(kv_idx))):
                length = self.spatial[dim]
                g, start, end = window(i, length, self.kernel[dim], self.stride[dim],
                                       self.dilation[dim], self.causal[dim])
                jp = j // self.dilation[dim]
                ok = ok & (j < length) & (i < length) & (j % self.dilation[dim] == g)
                ok = ok & (jp >= start) & (jp < end)
            return ok

        self.score_mod = None
        if rpb is not None:
            def score_mod(score, b, h, q_idx, kv_idx):
                idx = [h]
                for dim, (i, j) in enumerate(zip(coords(q_idx), coords(kv_idx))):
                    d, k = self.dilation[dim], self.kernel[dim]
                    idx.append(torch.clamp(j // d - i // d + k - 1, 0, 2 * k - 2))
                return score + rpb[tuple(idx)]
            self.score_mod = score_mod

        self.block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=self.n,
                                            KV_LEN=self.n, device=device, _compile=compile)
        self.attn = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def to_tiled(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *spatial, H, D]`` -> ``[B, H, N_padded, D]`` in tile-major token order."""
        b, *spatial, h, d = x.shape
        widths = []
        for s, p in reversed(list(zip(spatial, self.padded))):
            widths += [0, p - s]
        x = F.pad(x, [0, 0, 0, 0] + widths)
        shape = [b]
        for g, t in zip(self.grid, self.tile):
            shape += [g, t]
        x = x.reshape(*shape, h, d)
        nd = self.nd
        perm = [0, 2 * nd + 1] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)]
        return x.permute(*perm, 2 * nd + 2).reshape(b, h, self.n, d)

    def from_tiled(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_tiled`` (crops the padding)."""
        b, h, _, d = x.shape
        nd = self.nd
        x = x.reshape(b, h, *self.grid, *self.tile, d)
        perm = [0]
        for i in range(nd):
            perm += [2 + i, 2 + nd + i]
        x = x.permute(*perm, 1, 2 + 2 * nd).reshape(b, *self.padded, h, d)
        return x[(slice(None), *(slice(0, s) for s in self.spatial))]

    def __call__(self, q, k, v, scale: Optional[float] = None):
        """Tiled ``[B, H, N, D]`` inputs (from ``to_tiled``) -> tiled output."""
        return self.attn(q, k, v, score_mod=self.score_mod, block_mask=self.block_mask,
                         scale=scale, enable_gqa=k.shape[1] != q.shape[1])
