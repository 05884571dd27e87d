"""Tile-work accounting (``backends/triton/work.py``) against a brute-force walk of the tiles.

The brute force derives everything from the reference's dense per-dimension masks: a query
tile's key box is the span of keys any of its queries attends, a tile pair runs unmasked
when every query of a full tile attends every key of the key tile. Its useful count must
equal the attended pairs of the whole problem, so it also checks that the kernels' box (and
inverse range, or the dRPB kernel's key tiles at fixed offsets) never misses an attended
pair.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from natkit._window import dense_mask_1d
from natkit.backends.triton.configs import TileConfig, drpb_shifts
from natkit.backends.triton.work import describe, tile_work


def brute_force(spatial, kernel, dilation, stride, causal, cfg, kind):
    nd = len(spatial)
    pad = 3 - nd
    L = (1,) * pad + tuple(spatial)
    K = (1,) * pad + tuple(kernel)
    S = (1,) * pad + tuple(stride)
    D = (1,) * pad + tuple(dilation)
    C = (False,) * pad + tuple(causal)
    bq, bk = cfg.q_tile, cfg.k_tile
    computed = unmasked = useful = 0
    for groups in itertools.product(*(range(d) for d in D)):
        lg = [-(-(L[i] - groups[i]) // D[i]) for i in range(3)]
        masks = [dense_mask_1d(lg[i], K[i], S[i], 1, C[i]) for i in range(3)]
        # mask[i0, i1, i2, j0, j1, j2]: query (i0, i1, i2) attends key (j0, j1, j2)
        mask = (masks[0][:, None, None, :, None, None] & masks[1][None, :, None, None, :, None]
                & masks[2][None, None, :, None, None, :])
        outer = bq if kind != "dkdv" else bk
        inner = bk if kind != "dkdv" else bq
        for t in itertools.product(*(range(0, lg[i], outer[i]) for i in range(3))):
            own = tuple(slice(t[i], min(t[i] + outer[i], lg[i])) for i in range(3))
            sub = mask[own] if kind != "dkdv" else mask[(slice(None),) * 3 + own]
            # the other side's span touched by this tile, per dimension
            other_axes = (3, 4, 5) if kind != "dkdv" else (0, 1, 2)
            span = []
            for i in range(3):
                ax = other_axes[i]
                red = [a for a in range(6) if a != ax]
                hit = torch.nonzero(sub.any(dim=tuple(red))).flatten()
                span.append((int(hit.min()), int(hit.max()) + 1) if len(hit) else (0, 0))
            if kind == "drpb":  # key tiles at fixed offsets from the query tile, meeting the span
                starts = []
                for i, (lo, hi) in enumerate(span):
                    origin, count = drpb_shifts(K[i], bq[i], bk[i])
                    cs = (t[i] + origin + n * bk[i] for n in range(count))
                    starts.append([c for c in cs if c < hi and c + bk[i] > lo])
            else:
                starts = [range(lo, hi, inner[i]) for i, (lo, hi) in enumerate(span)]
            for u in itertools.product(*starts):
                other = tuple(slice(max(u[i], 0), max(u[i] + inner[i], 0)) for i in range(3))
                pair = mask[own + other] if kind != "dkdv" else mask[other + own]
                computed += cfg.block_m * cfg.block_n
                useful += int(pair.sum())
                full = all(t[i] + outer[i] <= lg[i] and u[i] + inner[i] <= lg[i] for i in range(3))
                if full and bool(pair.all()) and kind != "drpb":
                    unmasked += cfg.block_m * cfg.block_n
    return computed, unmasked, useful


def random_problem(rng: random.Random):
    nd = rng.choice((1, 2, 3))
    kernel = tuple(rng.randint(1, 5 if nd < 3 else 3) for _ in range(nd))
    dil = tuple(rng.choice((1, 1, 2)) for _ in range(nd))
    spatial = tuple(k * d + rng.randint(0, 6) for k, d in zip(kernel, dil))
    stride = tuple(rng.randint(1, k) for k in kernel)
    causal = tuple(rng.random() < 0.3 for _ in range(nd))
    tile = lambda: (1,) * (3 - nd) + tuple(rng.choice((1, 2, 4)) for _ in range(nd))  # noqa: E731
    return spatial, kernel, dil, stride, causal, TileConfig(tile(), tile())


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "drpb"])
def test_matches_brute_force(seed, kind):
    spatial, kernel, dil, stride, causal, cfg = random_problem(random.Random(seed))
    if kind == "drpb":  # the dRPB kernel runs only with rpb, which excludes causal masking
        causal = (False,) * len(spatial)
    work = tile_work(spatial, kernel, dil, stride, causal, cfg, kind)
    computed, unmasked, useful = brute_force(spatial, kernel, dil, stride, causal, cfg, kind)
    attended = 1
    for L, K, S, D, C in zip(spatial, kernel, stride, dil, causal):
        attended *= int(dense_mask_1d(L, K, S, D, C).sum())
    assert useful == attended == work.useful  # the kernels' ranges miss no attended pair
    assert (work.computed, work.unmasked) == (computed, unmasked)


def test_known_values():
    # NAT-Tiny stage 1 geometry with the 2-D default: an interior 8x16 query tile sees a
    # 14x22 key box, 2x3 key tiles of 8x8 (384 scores per query for 49 attended); border
    # tiles see less. Rows: 7 tiles of 2 key tiles. Columns: tiles at 0/16/32/48 see
    # 19/22/22/11 keys: 3+3+3+2 key tiles.
    cfg = TileConfig((1, 8, 16), (1, 8, 8))
    work = tile_work((56, 56), (7, 7), (1, 1), (1, 1), (False, False), cfg, batch_heads=128)
    assert work.programs == 7 * 4 * 128
    assert work.useful == 56 * 56 * 49 * 128
    assert work.computed == (7 * 2) * (3 + 3 + 3 + 2) * 128 * 128 * 64
    assert work.unmasked == 0  # no 8x8 key tile lies inside every 7x7 window of the tile
    assert "0.0" not in describe(work) and "100% of them masked" in describe(work)
    # kernel == size: one tile covering everything computes exactly the attended pairs
    full = tile_work((16,), (16,), (1,), (1,), (False,), TileConfig((1, 1, 16), (1, 1, 16)))
    assert full.computed == full.useful == full.unmasked == 256
    with pytest.raises(ValueError, match="kind"):
        tile_work((16,), (3,), (1,), (1,), (False,), TileConfig((1, 1, 16), (1, 1, 16)), "bwd")
