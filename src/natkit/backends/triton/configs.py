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


# Candidates per spatial rank: (q_tile, k_tile, warps, stages). The first is the default.
_CANDIDATES: dict[int, list[TileConfig]] = {
    1: [TileConfig((1, 1, 64), (1, 1, 64), 4, 2), TileConfig((1, 1, 128), (1, 1, 64), 8, 2),
        TileConfig((1, 1, 128), (1, 1, 128), 8, 2), TileConfig((1, 1, 64), (1, 1, 32), 4, 2),
        TileConfig((1, 1, 128), (1, 1, 32), 4, 2)],
    2: [TileConfig((1, 8, 16), (1, 8, 8), 4, 2), TileConfig((1, 8, 16), (1, 8, 16), 8, 2),
        TileConfig((1, 8, 8), (1, 8, 8), 4, 2), TileConfig((1, 16, 16), (1, 8, 16), 8, 2),
        TileConfig((1, 8, 16), (1, 4, 16), 4, 2), TileConfig((1, 16, 8), (1, 8, 8), 4, 2)],
    3: [TileConfig((4, 4, 8), (4, 4, 4), 4, 2), TileConfig((4, 4, 8), (4, 4, 8), 8, 2),
        TileConfig((2, 8, 8), (2, 4, 8), 4, 2), TileConfig((4, 8, 8), (2, 8, 8), 8, 2),
        TileConfig((2, 4, 8), (2, 4, 8), 4, 2)],
}


def _shrink_for_head_dim(cfg: TileConfig, block_d: int) -> TileConfig:
    """Large head dims: cap tiles at 64 tokens to stay within registers / shared memory."""
    if block_d < 256:
        return cfg

    def cap(tile):
        tile = list(tile)
        while math.prod(tile) > 64:
            i = max(range(3), key=lambda d: tile[d])
            tile[i] //= 2
        return tuple(tile)
    return replace(cfg, q_tile=cap(cfg.q_tile), k_tile=cap(cfg.k_tile), num_stages=1)


def candidates(ndim: int, block_d: int, group_lengths) -> list[TileConfig]:
    seen, out = set(), []
    for cfg in _CANDIDATES[ndim]:
        cfg = sanitize(_shrink_for_head_dim(cfg, block_d), group_lengths)
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
           device_type: str, bench: Callable[[TileConfig], float]) -> TileConfig:
    """The config for one launch; ``bench(cfg)`` times a candidate (used only when tuning)."""
    if kind in _OVERRIDE:
        return sanitize(_OVERRIDE[kind], group_lengths)
    full_key = (kind,) + key
    if full_key in _CACHE:
        return _CACHE[full_key]
    cands = candidates(ndim, block_d, group_lengths)
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
