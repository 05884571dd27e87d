"""The reference mask against an independent, per-query reading of the SPEC formula."""

import itertools
import random

import pytest
import torch

from natkit._checks import check_inputs
from natkit.backends.reference import dense_mask
from natkit.backends.portable import tile_tables
from natkit._window import group_window, window_1d


def spec_keys_1d(i, length, k, s, d, causal):
    """The SPEC text, line by line, in plain Python ints: the keys query ``i`` attends."""
    g = i % d
    ip = i // d
    lp = -(-(length - g) // d)  # ceil((L - g) / d)
    if causal:
        leader = min((ip // s) * s + s - 1, lp - 1)
        start = max(leader - k + 1, 0)
        end = ip + 1
    else:
        leader = min((ip // s) * s + s // 2, lp - 1)
        start = min(max(leader - k // 2, 0), lp - k)
        end = start + k
    return {j for j in range(length) if j % d == g and start <= j // d < end}


def brute_force_mask(spatial, kernel, stride, dilation, causal):
    tokens = list(itertools.product(*(range(n) for n in spatial)))
    per_dim = [[spec_keys_1d(i, n, k, s, d, c) for i in range(n)]
               for n, k, s, d, c in zip(spatial, kernel, stride, dilation, causal)]
    mask = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
    for a, qi in enumerate(tokens):
        for b, kj in enumerate(tokens):
            mask[a, b] = all(kj[x] in per_dim[x][qi[x]] for x in range(len(spatial)))
    return mask


def params(spatial, kernel, stride, dilation, causal):
    q = torch.zeros(1, *spatial, 1, 2)
    return check_inputs(len(spatial), q, q, q, kernel, dilation, stride, causal, None, None,
                        None, None)


def random_case(rng):
    nd = rng.choice((1, 2, 3))
    kernel = tuple(rng.randint(2, 5) for _ in range(nd))
    dil = tuple(rng.choice((1, 2, 3)) for _ in range(nd))
    spatial = tuple(k * d + rng.randint(0, 4) for k, d in zip(kernel, dil))
    if nd == 3:
        spatial = tuple(min(s, 9) for s in spatial)
        kernel = tuple(min(k, s // d) for k, s, d in zip(kernel, spatial, dil))
        kernel = tuple(max(k, 2) for k in kernel)
        dil = tuple(d if k * d <= s else 1 for k, d, s in zip(kernel, dil, spatial))
    stride = tuple(rng.randint(1, k) for k in kernel)
    causal = tuple(rng.random() < 0.4 for _ in range(nd))
    return spatial, kernel, stride, dil, causal


@pytest.mark.parametrize("seed", range(40))
def test_reference_mask_matches_spec(seed):
    case = random_case(random.Random(seed))
    p = params(*case)
    assert torch.equal(dense_mask(p), brute_force_mask(*case)), case


@pytest.mark.parametrize("seed", range(40, 70))
def test_tile_tables_cover_the_reference_mask(seed):
    """The portable backend's tiling, expanded back to pairs: every attended (query, key)
    pair exactly once per query row, nothing else, and the RPB index of each pair."""
    rng = random.Random(seed)
    case = random_case(rng)
    p = params(*case)
    tiles = [rng.randint(1, n + 1) for n in p.spatial]  # beyond the length: clamped
    tables = tile_tables(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal, "cpu",
                         tiles)
    want = dense_mask(p)
    got = torch.zeros_like(want)
    covered = torch.zeros(p.num_tokens, dtype=torch.bool)
    strides = [1] * p.ndim
    for i in reversed(range(p.ndim - 1)):
        strides[i] = strides[i + 1] * p.spatial[i + 1]
    for combo in itertools.product(*(range(t.queries.shape[0]) for t in tables)):
        rows = [t.queries[c] for t, c in zip(tables, combo)]
        cols = [t.keys[c] for t, c in zip(tables, combo)]
        masks = [t.mask[c] for t, c in zip(tables, combo)]
        rels = [t.rel[c] for t, c in zip(tables, combo)]
        for qs in itertools.product(*(range(len(r)) for r in rows)):
            query = sum(int(r[x]) * st for r, x, st in zip(rows, qs, strides))
            covered[query] = True
            row = torch.zeros(p.num_tokens, dtype=torch.long)
            for ks in itertools.product(*(range(len(c)) for c in cols)):
                if all(bool(m[x, y]) for m, x, y in zip(masks, qs, ks)):
                    key = sum(int(c[y]) * st for c, y, st in zip(cols, ks, strides))
                    row[key] += 1
                    # RPB index: (j' - i') + k - 1 per dimension
                    for dim, (r, c, x, y) in enumerate(zip(rows, cols, qs, ks)):
                        d, k = p.dilation[dim], p.kernel_size[dim]
                        assert int(rels[dim][x, y]) == int(c[y]) // d - int(r[x]) // d + k - 1
            assert row.max() <= 1, "a key counted twice in one query row"
            assert torch.equal(row.bool(), want[query]), (case, tiles, query)
            got[query] = row.bool()
    assert covered.all() and torch.equal(got, want)


@pytest.mark.parametrize("seed", range(70, 90))
def test_group_window_is_window_1d(seed):
    """The plain-int form the portable backend sizes its tiles with, query by query."""
    rng = random.Random(seed)
    length, k, d = rng.randint(2, 40), rng.randint(2, 9), rng.randint(1, 4)
    if k * d > length:
        k, d = 2, 1
    s, causal = rng.randint(1, k), rng.random() < 0.4
    first, count, pos = window_1d(length, k, s, d, causal)
    for i in range(length):
        group_len = -(-(length - i % d) // d)
        start, end = group_window(i // d, group_len, k, s, causal)
        assert (start, end - start) == ((int(first[i]) - i % d) // d, int(count[i]))


def test_special_cases():
    # every non-causal query sees exactly k keys per dim; k = L is full attention
    p = params((9, 7), (3, 7), (1, 1), (1, 1), (False, False))
    m = dense_mask(p)
    assert (m.sum(1) == 21).all()
    assert dense_mask(params((6,), (6,), (1,), (1,), (False,))).all()
    # causal with k = L is the lower triangle
    assert torch.equal(dense_mask(params((6,), (6,), (1,), (1,), (True,))),
                       torch.ones(6, 6, dtype=torch.bool).tril())
    # stride = k is blocked attention
    blocked = dense_mask(params((8,), (4,), (4,), (1,), (False,)))
    expect = torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool()
    assert torch.equal(blocked, expect)
    # even kernel 4: r = 2 keys left, the query, r - 1 = 1 right (away from borders)
    row = dense_mask(params((10,), (4,), (1,), (1,), (False,)))[5]
    assert row.nonzero().flatten().tolist() == [3, 4, 5, 6]
