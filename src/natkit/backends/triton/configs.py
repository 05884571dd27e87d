"""Kernel configurations in one place: tile shapes, warps, stages; defaults, autotuning, overrides.

A ``TileConfig`` gives the query tile and key tile as 3-D shapes (problems are 3-D inside
the kernels; 1-D/2-D inputs have leading size-1 dimensions). Each kernel kind (``"fwd"``,
``"dq"``, ``"dkdv"``, ``"drpb"``) picks its config by, in order: a caller override
(``override`` context manager / ``set_override``), the autotune cache (keyed by a bucketed
problem shape), autotuning on CUDA (unless ``NATKIT_TRITON_AUTOTUNE=0``), the heuristic
default. Under ``torch.use_deterministic_algorithms(True)`` only the override and the
default count, so the configs (and the rounding) do not depend on timings.

The rpb gradient has two schemes (``drpb_scheme``): ``"fused"``, atomic adds of every
attended pair's ``dS`` inside the dQ kernel, and ``"separate"``, the dRPB kernel, which sums
``dS`` over the batch and the query tiles in registers first and adds once per tile pair
at the end, at the price of recomputing the scores. Autotuning times both; without it the
dQ kernel's atomics run (``"fused"``). ``override(drpb=...)`` forces one: ``"fused"``,
``"separate"``, or a ``TileConfig`` for the dRPB kernel (which implies ``"separate"``).
Deterministic mode takes ``"separate"`` with partial sums stored per program and summed
in a fixed order (``op.fold_partials``) instead of atomics.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch

logger = logging.getLogger("natkit")

KINDS = ("fwd", "dq", "dkdv", "drpb")
DRPB_SCHEMES = ("fused", "separate")


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


def block_d(head_dim: int) -> int:
    """The head dimension as the kernels tile it: a power of two, at least 16."""
    return max(16, _pow2(head_dim))


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


# Candidates per (kind, rpb, head-dim class), default first, autotuning picks among them per
# shape bucket. Written as 2-D "query/key tile, warps, stages"; 1-D and 3-D use tiles of the
# same token counts (``_RANK_SHAPES``). Chosen without a GPU from ptxas's report for sm_90
# (``aot.py``; benchmarks/triton_static.py prints it): compiled as launched, every default
# below head dim 256 is spill-free with software-pipelined loads, and head dim 256 (one
# stage, for shared memory) spills at most 28 bytes (3-D dK/dV); tests/test_triton_static.py
# checks both. The 2-D head-dim-32 forward/dQ tiles (8x16 / 8x8 at 4 warps; 8x16 / 4x8 at 8
# warps with RPB) were the fastest measured on an H100 at NAT-Tiny stage 1 (before the
# loads were pipelined). Small query tiles compute 2-3x fewer scores for 7x7 kernels
# (``work.py``: 8x16 / 8x8 computes 8.2 per attended pair, 4x8 / 2x16 3.2); the head-dim-32
# alternates have the lowest issue-bound estimates at NAT-Tiny stages 1 and 3
# (``aot.issue_bound_ms``, stage 1: 0.033-0.056 ms vs 0.063-0.183 ms for the defaults; with
# RPB 0.061-0.092 ms vs 0.164-0.231 ms), which only a GPU can confirm. Head dims 65-128 (the
# large-kernel shapes of BENCH.md) default to the tiles with the lowest static bound,
# max(issue bound, tensor-core bound ``aot.mma_bound_ms``), on every such shape: forward
# 8x16 / 8x16 at 8 warps (the shape of Triton's Hopper flash-attention tutorial; 256² k31
# 0.51 ms vs 0.87 for 8x16 / 4x8, 1-D k2048 0.92 vs 1.32, FLUX 6.7 vs 11.3, 3-D video 26 vs
# 43) and dK/dV 2x8 queries / 8x8 keys at 4 warps (k31 1.41 vs 2.11 for 8x8 / 2x8, 1-D 2.5 vs
# 4.1, FLUX 21 vs 36, 3-D 77 vs 130); dQ's default already sits at its tensor-core bound.
_TABLE: dict[tuple[str, bool, int], str] = {
    ("fwd", False, 32): "8x16/8x8 w4 s2, 4x8/2x16 w2 s2, 2x8/8x8 w1 s2",
    ("fwd", True, 32): "8x16/4x8 w8 s2, 2x8/2x16 w1 s2, 2x8/4x8 w1 s2",
    ("fwd", False, 64): "8x16/8x8 w8 s2, 8x16/4x8 w8 s2, 4x8/2x16 w4 s2",
    ("fwd", True, 64): "8x8/4x8 w8 s2, 8x16/2x8 w8 s2, 4x8/2x16 w4 s2",
    ("fwd", False, 128): "8x16/8x16 w8 s2, 8x16/4x8 w8 s2, 8x8/8x8 w4 s2, 4x4/2x8 w4 s2",
    ("fwd", True, 128): "8x8/4x8 w8 s2, 8x8/2x8 w8 s2, 4x4/2x8 w4 s2",
    ("fwd", False, 256): "8x8/2x8 w8 s1, 4x4/2x8 w4 s1",
    ("fwd", True, 256): "4x4/2x8 w4 s1",
    ("dq", False, 32): "8x16/8x8 w4 s2, 4x8/2x16 w2 s2, 2x8/8x8 w1 s2",
    ("dq", True, 32): "8x16/4x8 w8 s2, 2x8/2x16 w1 s2, 2x8/4x8 w1 s2",
    ("dq", False, 64): "8x16/8x8 w8 s2, 8x8/4x8 w8 s2, 4x8/2x16 w4 s2",
    ("dq", True, 64): "8x8/4x8 w8 s2, 8x16/2x8 w8 s2, 4x8/2x16 w4 s2",
    ("dq", False, 128): "8x16/4x8 w8 s2, 8x8/2x8 w8 s2, 4x4/2x8 w4 s2",
    ("dq", True, 128): "8x16/4x8 w8 s2, 8x16/2x8 w8 s2, 4x4/2x8 w4 s2",
    ("dq", False, 256): "4x4/2x8 w4 s1",
    ("dq", True, 256): "4x4/2x8 w4 s1",
    ("dkdv", False, 32): "8x8/8x8 w8 s2, 4x8/2x16 w1 s2, 8x8/2x16 w2 s2",
    ("dkdv", True, 32): "8x8/8x8 w8 s2, 2x8/4x8 w1 s2, 4x8/4x8 w2 s2",
    ("dkdv", False, 64): "8x8/4x8 w8 s2, 8x16/2x8 w8 s2, 4x4/2x8 w4 s2",
    ("dkdv", True, 64): "8x8/4x8 w8 s2, 8x8/2x8 w8 s2, 4x4/2x8 w4 s2",
    ("dkdv", False, 128): "2x8/8x8 w4 s2, 8x8/2x8 w8 s2, 4x8/8x8 w4 s2, 4x4/2x8 w4 s2",
    ("dkdv", True, 128): "4x4/2x8 w4 s2, 2x8/8x8 w4 s2, 4x4/4x8 w4 s2",
    ("dkdv", False, 256): "4x4/2x8 w4 s1",
    ("dkdv", True, 256): "4x4/2x8 w4 s1",
    # the dRPB kernel: one stage, chosen when its loads sat under a per-item skip branch
    # (there was nothing to pipeline; the branch is gone since, two stages are untried).
    # Head dim 32 defaults to the lowest static bound at NAT-Tiny stages 1 and 3 (2x8/2x16:
    # 0.058 / 0.016 ms vs 0.078 / 0.026 for 4x8/4x8), larger ones to 4x8/4x8 (2-D 128² k13:
    # 0.135 ms vs 0.213-0.217 for the others, measured with the branch)
    ("drpb", True, 32): "2x8/2x16 w1 s1, 4x8/4x8 w2 s1, 8x8/8x8 w4 s1",
    ("drpb", True, 64): "4x8/4x8 w4 s1, 8x8/8x8 w4 s1, 2x8/2x16 w2 s1",
    ("drpb", True, 128): "4x8/4x8 w4 s1, 4x8/2x8 w4 s1, 2x8/2x16 w4 s1",
    ("drpb", True, 256): "4x4/2x8 w4 s1",
}

# float32 inputs hold 4-byte tiles in shared memory: where a 16-bit entry's default needs
# more than an H100's 227 KB per program as float32, the float32 entry leaves it out (the
# forward's 8x16 / 8x16 at head dims 65-128 takes 256 KB with IEEE products, 320 KB with
# TF32; it would fail to launch whenever it runs untuned: NATKIT_TRITON_AUTOTUNE=0 and
# deterministic mode). tests/test_triton_static.py compiles every float32 default.
_TABLE_F32: dict[tuple[str, bool, int], str] = {
    ("fwd", False, 128): "8x16/4x8 w8 s2, 8x8/8x8 w4 s2, 4x4/2x8 w4 s2",
}

# 1-D and 3-D tiles of the same token counts as the table's 2-D tiles
_RANK_SHAPES = {
    1: lambda n: (1, 1, n),
    3: {16: (2, 2, 4), 32: (2, 4, 4), 64: (2, 4, 8), 128: (4, 4, 8)}.__getitem__,
}


def _parse(entry: str, ndim: int) -> list[TileConfig]:
    out = []
    for item in entry.split(","):
        tiles, warps, stages = item.split()
        shapes = []
        for tile in tiles.split("/"):
            a, b = map(int, tile.split("x"))
            shapes.append((1, a, b) if ndim == 2 else _RANK_SHAPES[ndim](a * b))
        out.append(TileConfig(shapes[0], shapes[1], int(warps[1:]), int(stages[1:])))
    return out


def head_dim_class(block_d: int) -> int:
    """The table's head-dim classes: 32 (head dims up to 32), 64, 128, 256."""
    return min(max(block_d, 32), 256)


def candidates(ndim: int, block_d: int, group_lengths, kind: str, has_rpb: bool, *,
               dtype: torch.dtype) -> list[TileConfig]:
    """Autotuning candidates for one launch (inputs of ``dtype``), default first, clamped
    to the problem."""
    seen, out = set(), []
    has_rpb = has_rpb or kind == "drpb"  # the dRPB kernel exists only with a bias
    entry = (kind, has_rpb, head_dim_class(block_d))
    table = _TABLE_F32 if dtype == torch.float32 and entry in _TABLE_F32 else _TABLE
    for cfg in _parse(table[entry], ndim):
        cfg = sanitize(cfg, group_lengths)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


_OVERRIDE: dict[str, Union[TileConfig, str]] = {}
_CACHE: dict[tuple, TileConfig] = {}
_SCHEMES: dict[tuple, str] = {}
_LAST: dict[str, TileConfig] = {}
_LAST_SCHEME: list[Optional[str]] = [None]


def set_override(kind: str, cfg: Union[TileConfig, str, None]) -> None:
    """Forces ``cfg`` for kernel ``kind`` (``"fwd"``, ``"dq"``, ``"dkdv"``, ``"drpb"``);
    ``None`` clears it. ``"drpb"`` also takes a scheme name, ``"fused"`` or ``"separate"``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if cfg is None:
        _OVERRIDE.pop(kind, None)
    elif kind == "drpb" and isinstance(cfg, str):
        if cfg not in DRPB_SCHEMES:
            raise ValueError(f"the drpb scheme must be one of {DRPB_SCHEMES}, got {cfg!r}")
        _OVERRIDE[kind] = cfg
    elif not isinstance(cfg, TileConfig):
        what = "a TileConfig, 'fused', 'separate'" if kind == "drpb" else "a TileConfig"
        raise TypeError(f"cfg for {kind!r} must be {what} or None, got {type(cfg).__name__}")
    else:
        _check_config(cfg)
        _OVERRIDE[kind] = cfg


def _check_config(cfg: TileConfig) -> None:
    for name in ("q_tile", "k_tile"):
        tile = getattr(cfg, name)
        if (not isinstance(tile, tuple) or len(tile) != 3
                or not all(isinstance(t, int) and t >= 1 and t & (t - 1) == 0 for t in tile)):
            raise ValueError(f"TileConfig.{name} must be 3 powers of two, got {tile!r}")
    if cfg.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"TileConfig.num_warps must be one of (1, 2, 4, 8, 16), got "
                         f"{cfg.num_warps!r}")
    if not isinstance(cfg.num_stages, int) or cfg.num_stages < 1:
        raise ValueError(f"TileConfig.num_stages must be an int >= 1, got {cfg.num_stages!r}")


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
    """On CUDA unless ``NATKIT_TRITON_AUTOTUNE=0``; never under
    ``torch.use_deterministic_algorithms`` (timings vary between runs, and with them the
    configs and the rounding; PyTorch's inductor stops autotuning there too)."""
    return (device_type == "cuda" and os.environ.get("NATKIT_TRITON_AUTOTUNE", "1") != "0"
            and not torch.are_deterministic_algorithms_enabled())


def choose(kind: str, key: tuple, ndim: int, block_d: int, group_lengths,
           device_type: str, bench: Callable[[TileConfig], float],
           has_rpb: bool, dtype: torch.dtype) -> TileConfig:
    """The config for one launch; ``bench(cfg)`` times a candidate (used only when tuning)."""
    if isinstance(_OVERRIDE.get(kind), TileConfig):
        _LAST[kind] = sanitize(_OVERRIDE[kind], group_lengths)
        return _LAST[kind]
    full_key = (kind,) + key
    # deterministic mode: the default, neither a tuned entry nor an entry for later calls
    cache = not torch.are_deterministic_algorithms_enabled()
    if cache and full_key in _CACHE:
        _LAST[kind] = _CACHE[full_key]
        return _LAST[kind]
    cands = candidates(ndim, block_d, group_lengths, kind, has_rpb, dtype=dtype)
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
    if cache:
        _CACHE[full_key] = best
    _LAST[kind] = best
    return best


def drpb_shifts(kernel: int, q_tile: int, k_tile: int) -> tuple[int, int]:
    """One dimension of the dRPB kernel's key tiles, at fixed offsets from the query tile:
    ``(origin, count)``, tiles starting ``origin + u * k_tile`` tokens from the query tile's
    start for ``u < count``. They cover every offset a window can have (``-(K-1) .. K-1``;
    rpb excludes causal masking) and are aligned so that an interior query tile's window
    box (which starts ``K // 2`` before it) starts at a tile edge: fewest tiles touched."""
    base = kernel // 2
    below = -(-(kernel - 1 - base) // k_tile)  # tiles before the interior alignment
    reach = q_tile + kernel - 1 + base  # past the last offset (q_tile - 1 + K - 1), from base
    return -base - below * k_tile, below + -(-reach // k_tile)


def drpb_scheme(key: tuple, device_type: str, time_fused: Callable[[], float],
                time_separate: Callable[[], float], deterministic: bool = False) -> str:
    """How one backward call sums the rpb gradient: ``"fused"`` or ``"separate"`` (module
    docstring). ``time_*()`` runs the dQ pass of a scheme, its configs tuned, and returns
    milliseconds; they are called only when tuning. ``deterministic``
    (``torch.use_deterministic_algorithms``) takes ``"separate"``, whose kernel then stores
    partial sums instead of adding them with atomics; forcing ``"fused"`` there raises, or
    warns with ``warn_only=True``, as PyTorch's own nondeterministic operations do."""
    forced = _OVERRIDE.get("drpb")
    if deterministic and forced == "fused":
        msg = ("natkit triton: override(drpb='fused') sums the rpb gradient with atomics, whose "
               "rounding depends on run order, but torch.use_deterministic_algorithms(True) "
               "is set")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    if forced is not None:  # a scheme name, or a dRPB tile (which implies "separate")
        scheme = "fused" if forced == "fused" else "separate"
    elif deterministic:
        scheme = "separate"
    elif key in _SCHEMES:
        scheme = _SCHEMES[key]
    else:
        scheme = "fused"
        if autotune_enabled(device_type):
            try:
                fused, separate = time_fused(), time_separate()
                scheme = "separate" if separate < fused else "fused"
                logger.debug("natkit triton: drpb %s: fused %.3f ms, separate %.3f ms -> %s",
                             key, fused, separate, scheme)
            except Exception as err:  # e.g. no config of the dRPB kernel fits: keep the atomics
                logger.debug("natkit triton: drpb %s: timing failed (%s), fused", key, err)
        _SCHEMES[key] = scheme
    _LAST_SCHEME[0] = scheme
    return scheme


def last_drpb_scheme() -> Optional[str]:
    """The rpb-gradient scheme of the latest backward call with rpb in this process."""
    return _LAST_SCHEME[0]


def last_chosen(kind: str) -> Optional[TileConfig]:
    """The config of the latest launch of kernel ``kind`` in this process (benchmarks use
    it to report the tile work of what actually ran)."""
    return _LAST.get(kind)


def bucket(n: int) -> int:
    """Shape bucket for the cache: the next power of two."""
    return _pow2(n)
