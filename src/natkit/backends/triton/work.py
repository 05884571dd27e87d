"""Tile-work accounting: how many scores the kernels compute for a problem and a tile config.

The kernels visit, per query tile, every key tile of its neighborhoods' bounding box
(forward and dQ), or per key tile every query tile of its inverse neighborhood (dK/dV).
Each visit computes a full ``BLOCK_M x BLOCK_N`` score tile; only some of those scores are
attended pairs. This module counts, exactly as the kernels iterate and without a GPU:

- ``computed``: scores computed (``BLOCK_M * BLOCK_N`` per visited tile pair);
- ``unmasked``: scores in tile pairs that run the unmasked step (no window mask);
- ``useful``: attended query-key pairs (what an ideal kernel computes).

``computed / useful`` is the tile waste. Iteration is a Cartesian product over dimensions
(tile slots, and the key box of a tile, are per-dimension ranges), so every count is a
product of per-dimension sums. Windows come from ``natkit._window`` (the SPEC formula) in
dilation-group coordinates, as in the kernels.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache


from ..._window import window_1d
from .configs import TileConfig, drpb_shifts


@dataclass(frozen=True)
class TileWork:
    programs: int
    computed: int
    unmasked: int
    useful: int

    @property
    def waste(self) -> float:
        """Scores computed per attended pair (1.0 is ideal)."""
        return self.computed / max(self.useful, 1)

    @property
    def masked_fraction(self) -> float:
        """Fraction of the computed scores that pay for the window mask."""
        return 1.0 - self.unmasked / max(self.computed, 1)


@lru_cache(maxsize=4096)
def _windows(length: int, kernel: int, stride: int, causal: bool) -> tuple[list, list]:
    """``(start, end)`` per query of one dilation group (group coordinates)."""
    start, count, _ = window_1d(length, kernel, stride, 1, causal)
    return start.tolist(), (start + count).tolist()


def _group_lengths(length: int, dilation: int) -> list[int]:
    return [-(-(length - g) // dilation) for g in range(dilation)]


def _walk_1d(length, kernel, stride, dilation, causal, block, visit) -> tuple[int, int, int]:
    """One dimension: every dilation group's tiles of ``block`` tokens, each counted by
    ``visit(start, end, lg, origin) -> (tiles visited, unmasked)``; returns
    ``(tiles, visits, unmasked)``."""
    tiles = visits = inside = 0
    for lg in _group_lengths(length, dilation):
        start, end = _windows(lg, kernel, stride, causal)
        for origin in range(0, lg, block):
            n, unmasked = visit(start, end, lg, origin)
            tiles += 1
            visits += n
            inside += unmasked
    return tiles, visits, inside


def _query_tiles_1d(length, kernel, stride, dilation, causal, bq, bk) -> tuple[int, int, int]:
    """One dimension, query-tile iteration (forward / dQ): ``(tiles, key tiles, unmasked)``."""
    def visit(start, end, lg, a):
        b = min(a + bq, lg) - 1
        lo, hi = start[a], min(end[b], lg)
        full_lo, full_hi = start[b], min(end[a], lg)
        n = -(-(hi - lo) // bk)
        if a + bq > lg:
            return n, 0
        return n, sum(1 for u in range(n)
                      if lo + u * bk >= full_lo and lo + (u + 1) * bk <= full_hi)
    return _walk_1d(length, kernel, stride, dilation, causal, bq, visit)


def _key_tiles_1d(length, kernel, stride, dilation, causal, bq, bk) -> tuple[int, int, int]:
    """One dimension, key-tile iteration (dK/dV): ``(tiles, query tiles, unmasked)``."""
    def visit(start, end, lg, c):
        e = min(c + bk, lg) - 1
        # the queries attending any key of [c, e]: end > c and start <= e (both monotone)
        first = bisect.bisect_right(end, c)
        last = bisect.bisect_right(start, e)
        n = max(-(-(last - first) // bq), 0)
        if c + bk > lg:
            return n, 0
        return n, sum(1 for a in range(first, first + n * bq, bq)
                      if a + bq <= lg and start[a + bq - 1] <= c and c + bk <= end[a])
    return _walk_1d(length, kernel, stride, dilation, causal, bk, visit)


@lru_cache(maxsize=1024)
def drpb_slots_1d(length, kernel, stride, dilation, causal, bq, bk) -> tuple:
    """One dimension of the dRPB kernel's work items: for each key-tile shift
    (``configs.drpb_shifts``: key tiles ``origin + u * bk`` tokens from the query tile),
    ``(offset, slots)``: its offset from the query tile and the query-tile slots
    (``tile index * dilation + group``, as ``window.tile_slot`` numbers them) whose window
    box meets that key tile. An item meets a 3-D shift exactly when its slot meets it in
    every dimension, so the kernel's items are products of these lists."""
    origin, count = drpb_shifts(kernel, bq, bk)
    offsets = [origin + u * bk for u in range(count)]
    slots = [[] for _ in offsets]
    for g, lg in enumerate(_group_lengths(length, dilation)):
        start, end = _windows(lg, kernel, stride, causal)
        for a in range(0, lg, bq):
            lo, hi = start[a], min(end[min(a + bq, lg) - 1], lg)
            for u, o in enumerate(offsets):
                if a + o < hi and a + o + bk > lo:
                    slots[u].append(a // bq * dilation + g)
    return tuple((o, tuple(sorted(s))) for o, s in zip(offsets, slots))


def _drpb_tiles_1d(length, kernel, stride, dilation, causal, bq, bk) -> tuple[int, int, int]:
    """One dimension, the dRPB kernel: ``(tiles, key tiles, 0)``, the key tiles being, per
    query tile, the shifts it meets (every pair is masked there)."""
    tiles = sum(-(-lg // bq) for lg in _group_lengths(length, dilation))
    shifts = drpb_slots_1d(length, kernel, stride, dilation, causal, bq, bk)
    return tiles, sum(len(s) for _, s in shifts), 0


def _useful_1d(length, kernel, stride, dilation, causal) -> int:
    _, count, _ = window_1d(length, kernel, stride, dilation, causal)
    return int(count.sum())


def tile_work(spatial, kernel, dilation, stride, causal, cfg: TileConfig, kind: str = "fwd",
              batch_heads: int = 1) -> TileWork:
    """Work of kernel ``kind`` (``"fwd"``, ``"dq"``, ``"dkdv"`` or ``"drpb"``) for one problem.

    Per-dimension arguments are sequences of the input's rank (1 to 3); ``cfg`` holds 3-D
    tiles as the kernels use them (leading dimensions of size 1 for lower ranks).
    ``batch_heads`` multiplies every count (batch * query heads); for ``"dkdv"`` with GQA the
    launch has ``programs / (heads per kv head)`` programs, each looping over its heads; for
    ``"drpb"``, ``programs`` counts work items (query tiles), which its programs share.
    """
    per_dim = {"fwd": _query_tiles_1d, "dq": _query_tiles_1d, "dkdv": _key_tiles_1d,
               "drpb": _drpb_tiles_1d}.get(kind)
    if per_dim is None:
        raise ValueError(f"kind must be 'fwd', 'dq', 'dkdv' or 'drpb', got {kind!r}")
    pad = 3 - len(spatial)
    dims = zip((1,) * pad + tuple(spatial), (1,) * pad + tuple(kernel),
               (1,) * pad + tuple(stride), (1,) * pad + tuple(dilation),
               (False,) * pad + tuple(bool(c) for c in causal), cfg.q_tile, cfg.k_tile)
    tiles = visits = inside = useful = 1
    for L, K, S, D, C, bq, bk in dims:
        t, v, i = per_dim(L, K, S, D, C, bq, bk)
        tiles, visits, inside = tiles * t, visits * v, inside * i
        useful *= _useful_1d(L, K, S, D, C)
    scores = cfg.block_m * cfg.block_n * batch_heads
    return TileWork(programs=tiles * batch_heads, computed=visits * scores,
                    unmasked=inside * scores, useful=useful * batch_heads)


def describe(work: TileWork) -> str:
    return (f"{work.programs} programs, {work.waste:.2f} scores computed per attended pair, "
            f"{100 * work.masked_fraction:.0f}% of them masked")


__all__ = ["TileWork", "describe", "drpb_slots_1d", "tile_work"]
