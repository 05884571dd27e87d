"""Kernel configurations in one place: tile shapes, warps, stages; defaults, autotuning, overrides.

A ``TileConfig`` gives the query tile and key tile as 3-D shapes (problems are 3-D inside
the kernels; 1-D/2-D inputs have leading size-1 dimensions). Each kernel kind (``"fwd"``,
``"dq"``, ``"dkdv"``) picks its config by, in order: a caller override (``override``
context manager / ``set_override``), the autotune cache (keyed by a bucketed problem
shape), autotuning on CUDA (unless ``NATKIT_TRITON_AUTOTUNE=0``), the heuristic default.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Optional

logger = logging.getLogger("natkit")

KINDS = ("fwd", "dq", "dkdv")


@dataclass(frozen=True)
class TileConfig:
    q_tile: tuple[int, int, int]
    k_tile: tuple[int, int, int]
    num_warps: int = 4
    num_stages: int = 2

    @property
    def block_m(self) -> int:
        return math.prod(self.q_tile)

    @property
    def block_n(self) -> int:
        return math.prod(self.k_tile)


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def fit(tile: tuple[int, int, int], group_lengths: tuple[int, int, int]) -> tuple[int, int, int]:
    """Clamps a tile to the problem (no dimension wider than needed) keeping >= 16 tokens.

    ``tl.dot`` needs every operand dimension >= 16, so a tile that clamps below 16 tokens
    grows along its innermost dimension (the extra tokens are masked).
    """
    out = [max(1, min(t, _pow2(n))) for t, n in zip(tile, group_lengths)]
    while math.prod(out) < 16:
        out[2] *= 2
    return tuple(out)


def sanitize(cfg: TileConfig, group_lengths) -> TileConfig:
    return replace(cfg, q_tile=fit(cfg.q_tile, group_lengths), k_tile=fit(cfg.k_tile, group_lengths))


# Candidates per (rank, kind, rpb), default first. Chosen by register pressure (ptxas -v for
# sm_90: the RPB gather's per-element 64-bit addresses spilled up to 4 KB per thread at 4 warps
# on 128x64 tiles; the RPB candidates below compile without spills) and by H100 timings
# (2-D without RPB: 8x16 query / 8x8 key tiles at 4 warps measured fastest on NAT-Tiny
# stage 1); autotuning picks among them per shape bucket.
def _c(q, k, warps, stages):
    return TileConfig(q, k, warps, stages)


_CANDIDATES: dict[tuple, list[TileConfig]] = {
    (1, "fwd", False): [_c((1, 1, 128), (1, 1, 64), 8, 2), _c((1, 1, 64), (1, 1, 64), 4, 2)],
    (1, "fwd", True): [_c((1, 1, 128), (1, 1, 32), 8, 1), _c((1, 1, 64), (1, 1, 64), 8, 1)],
    (1, "dkdv", False): [_c((1, 1, 64), (1, 1, 32), 4, 2), _c((1, 1, 64), (1, 1, 64), 4, 2)],
    (1, "dkdv", True): [_c((1, 1, 64), (1, 1, 64), 8, 1), _c((1, 1, 64), (1, 1, 32), 4, 1)],
    (2, "fwd", False): [_c((1, 8, 16), (1, 8, 8), 4, 2), _c((1, 8, 16), (1, 8, 8), 8, 2),
                        _c((1, 8, 8), (1, 8, 8), 4, 2)],
    (2, "fwd", True): [_c((1, 8, 16), (1, 4, 8), 8, 1), _c((1, 8, 8), (1, 8, 8), 8, 1)],
    (2, "dkdv", False): [_c((1, 8, 16), (1, 8, 8), 4, 2), _c((1, 8, 16), (1, 8, 8), 8, 2),
                         _c((1, 8, 8), (1, 4, 8), 4, 2)],
    (2, "dkdv", True): [_c((1, 8, 8), (1, 8, 8), 8, 1), _c((1, 8, 8), (1, 4, 8), 4, 1)],
    (3, "fwd", False): [_c((4, 4, 8), (4, 4, 4), 8, 2), _c((2, 4, 8), (4, 4, 4), 4, 2)],
    (3, "fwd", True): [_c((4, 4, 8), (2, 4, 4), 8, 1), _c((2, 4, 8), (2, 4, 8), 8, 1)],
    (3, "dkdv", False): [_c((2, 4, 8), (2, 4, 4), 4, 2), _c((4, 4, 8), (4, 4, 4), 8, 2)],
    (3, "dkdv", True): [_c((2, 4, 8), (2, 4, 8), 8, 1), _c((2, 4, 8), (2, 4, 4), 4, 1)],
}


def _shrink_for_head_dim(cfg: TileConfig, block_d: int, kind: str) -> TileConfig:
    """Large head dims: fewer tokens per tile to stay within registers / shared memory
    (dK/dV holds two ``[keys, head_dim]`` fp32 accumulators)."""
    limit = 64 if block_d >= 256 else (32 if kind == "dkdv" and block_d >= 128 else 1 << 30)
    q_limit = 64 if block_d >= 256 else 1 << 30

    def cap(tile, n):
        tile = list(tile)
        while math.prod(tile) > n:
            i = max(range(3), key=lambda d: tile[d])
            tile[i] //= 2
        return tuple(tile)
    k_tile = cap(cfg.k_tile, limit)
    q_tile = cap(cfg.q_tile, q_limit)
    return replace(cfg, q_tile=q_tile, k_tile=k_tile,
                   num_stages=1 if block_d >= 256 else cfg.num_stages)


def candidates(ndim: int, block_d: int, group_lengths, kind: str = "fwd",
               has_rpb: bool = False) -> list[TileConfig]:
    table_kind = "fwd" if kind == "dq" else kind  # dQ walks the forward's key box
    seen, out = set(), []
    for cfg in _CANDIDATES[(ndim, table_kind, has_rpb)]:
        cfg = sanitize(_shrink_for_head_dim(cfg, block_d, kind), group_lengths)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


_OVERRIDE: dict[str, TileConfig] = {}
_CACHE: dict[tuple, TileConfig] = {}


def set_override(kind: str, cfg: Optional[TileConfig]) -> None:
    """Forces ``cfg`` for kernel ``kind`` (``"fwd"``, ``"dq"``, ``"dkdv"``); ``None`` clears it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if cfg is None:
        _OVERRIDE.pop(kind, None)
    elif not isinstance(cfg, TileConfig):
        raise TypeError(f"cfg must be a TileConfig or None, got {type(cfg).__name__}")
    else:
        _OVERRIDE[kind] = cfg


@contextlib.contextmanager
def override(**configs: Optional[TileConfig]):
    """``with override(fwd=TileConfig(...), dkdv=...):`` forces configs inside the block."""
    saved = dict(_OVERRIDE)
    try:
        for kind, cfg in configs.items():
            set_override(kind, cfg)
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def autotune_enabled(device_type: str) -> bool:
    return device_type == "cuda" and os.environ.get("NATKIT_TRITON_AUTOTUNE", "1") != "0"


def choose(kind: str, key: tuple, ndim: int, block_d: int, group_lengths,
           device_type: str, bench: Callable[[TileConfig], float],
           has_rpb: bool = False) -> TileConfig:
    """The config for one launch; ``bench(cfg)`` times a candidate (used only when tuning)."""
    if kind in _OVERRIDE:
        return sanitize(_OVERRIDE[kind], group_lengths)
    full_key = (kind,) + key
    if full_key in _CACHE:
        return _CACHE[full_key]
    cands = candidates(ndim, block_d, group_lengths, kind, has_rpb)
    best = cands[0]
    if autotune_enabled(device_type) and len(cands) > 1:
        timings = []
        for cfg in cands:
            try:
                timings.append((bench(cfg), cfg))
            except Exception as err:  # e.g. out of shared memory for this tile: skip it
                logger.debug("natkit triton: %s config %s failed: %s", kind, cfg, err)
        if timings:
            best = min(timings, key=lambda x: x[0])[1]
            logger.debug("natkit triton: tuned %s %s -> %s", kind, key, best)
    _CACHE[full_key] = best
    return best


def bucket(n: int) -> int:
    """Shape bucket for the cache: the next power of two."""
    return _pow2(n)
