"""In-kernel neighborhood geometry: the SPEC window formula and tile ranges, per dimension.

Every problem is treated as 3-D (1-D and 2-D inputs get leading size-1 dimensions with
kernel 1, stride 1, dilation 1, for which the formula yields the single key 0). Tiles live
in *group coordinates*: inside one dilation group ``g`` a dimension of length ``L`` becomes
an undilated dimension of length ``L' = ceil((L - g) / d)`` and real index ``i = i' * d + g``,
so dilation is pure index math and never changes the tile logic.

Because the window start ``start'(i')`` and end ``end'(i')`` are non-decreasing in ``i'``,
a query tile ``[a, b]`` touches exactly the keys ``[start'(a), end'(b))`` and every key of
``[start'(b), end'(a))`` is attended by every query of the tile (the unmasked region); a
key tile ``[c, e]`` is touched by the queries ``first i' with end'(i') > c`` through
``last i' with start'(i') <= e`` (binary search: monotone predicates).
"""

import triton
import triton.language as tl


@triton.jit
def win_start(i, L, K, S, CAUSAL: tl.constexpr):
    """First attended key (group coordinates) of query ``i`` in a group of length ``L``."""
    blk = (i // S) * S
    if CAUSAL:
        leader = tl.minimum(blk + S - 1, L - 1)
        start = tl.maximum(leader - K + 1, 0)
    else:
        leader = tl.minimum(blk + S // 2, L - 1)
        start = tl.maximum(tl.minimum(leader - K // 2, L - K), 0)
    return start


@triton.jit
def win_end(i, start, K, CAUSAL: tl.constexpr):
    """One past the last attended key of query ``i`` whose window starts at ``start``."""
    if CAUSAL:
        end = i + 1
    else:
        end = start + K
    return end


@triton.jit
def group_len(L, g, D):
    """Length of dilation group ``g`` of a dimension of length ``L`` with dilation ``D``."""
    return (L - g + D - 1) // D


@triton.jit
def key_span(a, L, K, S, CAUSAL: tl.constexpr, BQ: tl.constexpr):
    """The query tile ``[a, a + BQ)`` (clipped to ``L``) in one dimension: every query of it
    attends keys in ``[lo, hi)``, and all of them attend ``[full_lo, full_hi)``:
    ``(lo, hi, full_lo, full_hi)``."""
    first = tl.minimum(a, L - 1)
    last = tl.minimum(a + BQ, L) - 1
    lo = win_start(first, L, K, S, CAUSAL)
    full_lo = win_start(last, L, K, S, CAUSAL)
    hi = tl.minimum(win_end(last, full_lo, K, CAUSAL), L)
    full_hi = tl.minimum(win_end(first, lo, K, CAUSAL), L)
    return lo, hi, full_lo, full_hi


@triton.jit
def key_box(a, L, K, S, CAUSAL: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    """The key tiles of the query tile ``[a, a + BQ)`` (clipped to ``L``) in one dimension:
    ``(lo, n, full_lo, full_hi, full)``. Its key tiles start at ``lo + u * BK`` for ``u < n``;
    every query of the tile attends the keys ``[full_lo, full_hi)``; ``full`` says no query
    of the tile lies past ``L``."""
    lo, hi, full_lo, full_hi = key_span(a, L, K, S, CAUSAL, BQ)
    return lo, tl.cdiv(hi - lo, BK), full_lo, full_hi, a + BQ <= L


@triton.jit
def query_range(c, e, L, K, S, CAUSAL: tl.constexpr):
    """For the key tile ``[c, e]`` (``e < L``): the queries ``[lo, hi)`` that attend any of its keys."""
    # lo: first query whose window ends after c
    lo = c * 0
    hi = c * 0 + L
    while lo < hi:
        mid = (lo + hi) // 2
        past = win_end(mid, win_start(mid, L, K, S, CAUSAL), K, CAUSAL) > c
        hi = tl.where(past, mid, hi)
        lo = tl.where(past, lo, mid + 1)
    first = lo
    # hi: first query whose window starts after e
    lo = c * 0
    hi = c * 0 + L
    while lo < hi:
        mid = (lo + hi) // 2
        after = win_start(mid, L, K, S, CAUSAL) > e
        hi = tl.where(after, mid, hi)
        lo = tl.where(after, lo, mid + 1)
    return first, lo


@triton.jit
def query_box(c, L, K, S, CAUSAL: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr):
    """The query tiles of the key tile ``[c, c + BK)`` (clipped to ``L``) in one dimension:
    ``(lo, n)``, tiles starting at ``lo + u * BQ`` for ``u < n``."""
    lo, hi = query_range(c, tl.minimum(c + BK, L) - 1, L, K, S, CAUSAL)
    return lo, tl.maximum(tl.cdiv(hi - lo, BQ), 0)


@triton.jit
def box_tile(t, lo0, lo1, lo2, n1, n2, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
    """Origin of tile ``t`` (row-major) of a box of ``n0 x n1 x n2`` tiles of ``B0 x B1 x B2``
    starting at ``lo*``."""
    return lo0 + (t // (n1 * n2)) * B0, lo1 + ((t // n2) % n1) * B1, lo2 + (t % n2) * B2


@triton.jit
def slot_tile(slot, L, D, B: tl.constexpr):
    """One dimension of a tile slot: slot ``slot`` is tile ``slot // D`` (of ``B`` tokens) of
    dilation group ``g = slot % D``: ``(g, the group's length, the tile's origin in group
    coordinates)``."""
    g = slot % D
    return g, group_len(L, g, D), (slot // D) * B


@triton.jit
def tile_slot(pid, NT1, NT2, L0, L1, L2, D0, D1, D2,
              B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
    """The tile of flat slot id ``pid`` (``NT*`` slots per dimension, ``dilation * tiles per
    group``) of ``B0 x B1 x B2`` tokens: ``slot_tile`` of each dimension, ``(g0, g1, g2, Lg0,
    Lg1, Lg2, a0, a1, a2)``."""
    g0, Lg0, a0 = slot_tile(pid // (NT2 * NT1), L0, D0, B0)
    g1, Lg1, a1 = slot_tile((pid // NT2) % NT1, L1, D1, B1)
    g2, Lg2, a2 = slot_tile(pid % NT2, L2, D2, B2)
    return g0, g1, g2, Lg0, Lg1, Lg2, a0, a1, a2


@triton.jit
def program_ids(NSLOTS, BIG: tl.constexpr):
    """``(slot, batch * heads index)`` of a program of the flat grid ``NSLOTS * batch *
    heads`` (one axis: CUDA caps the second and third at 65535 programs). With ``BIG`` both
    are int64, and so is every coordinate computed from them: offsets into a tensor whose
    batch element spans 2^31 elements or more (e.g. a fused-qkv view of a large video)
    would wrap in int32."""
    pid = tl.program_id(0)
    if BIG:
        pid = pid.to(tl.int64)
    return pid % NSLOTS, pid // NSLOTS


@triton.jit
def wide(x, BIG: tl.constexpr):
    """``x`` as an address offset factor: int64 with ``BIG`` (``program_ids``)."""
    if BIG:
        return x.to(tl.int64)
    return x


@triton.jit
def tile_coords(start0, start1, start2, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
    """Group coordinates of the ``B0*B1*B2`` tokens of the tile starting at ``start*``."""
    r = tl.arange(0, B0 * B1 * B2)
    return start0 + r // (B1 * B2), start1 + (r // B2) % B1, start2 + r % B2


@triton.jit
def window_lengths(i, ws, L, K, CAUSAL: tl.constexpr):
    """Per-query window length (``end' - start'``)."""
    return win_end(i, ws, K, CAUSAL) - ws


@triton.jit
def query_windows(i0, i1, i2, L0, L1, L2, K0, K1, K2, S0, S1, S2,
                  C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr):
    """The windows of a tile's queries for ``window_mask``: ``(valid, start0, length0, start1,
    length1, start2, length2)``; a query past its group (``valid`` false) gets an empty
    window."""
    valid = (i0 < L0) & (i1 < L1) & (i2 < L2)
    ws0 = win_start(i0, L0, K0, S0, C0)
    wl0 = window_lengths(i0, ws0, L0, K0, C0)
    ws1 = win_start(i1, L1, K1, S1, C1)
    wl1 = window_lengths(i1, ws1, L1, K1, C1)
    ws2 = win_start(i2, L2, K2, S2, C2)
    wl2 = tl.where(valid, window_lengths(i2, ws2, L2, K2, C2), 0)
    return valid, ws0, wl0, ws1, wl1, ws2, wl2


@triton.jit
def window_mask(j0, j1, j2, ws0, wl0, ws1, wl1, ws2, wl2, ND: tl.constexpr):
    """``start' <= j < start' + length`` in every active dimension (one unsigned compare each).

    Operands come pre-broadcast. Keys past the group end never pass for a valid query (its
    window lies inside the group); invalid queries carry ``wl2 == 0`` and attend nothing.
    """
    valid = _u32(j2 - ws2) < _u32(wl2)
    if ND >= 2:
        valid = valid & (_u32(j1 - ws1) < _u32(wl1))
    if ND == 3:
        valid = valid & (_u32(j0 - ws0) < _u32(wl0))
    return valid


@triton.jit
def _u32(x):
    """``x`` (int32, or int64 with ``BIG``: small values) reinterpreted as unsigned 32-bit."""
    return x.to(tl.int32).to(tl.uint32, bitcast=True)


@triton.jit
def rpb_flat(i0, i1, i2, K1, K2):
    """Token coordinates flattened with the bias table's strides: the bias index of a pair is
    ``rpb_flat(j) - rpb_flat(i) + rpb_center`` (one subtraction per pair)."""
    return (i0 * (2 * K1 - 1) + i1) * (2 * K2 - 1) + i2


@triton.jit
def rpb_center(K0, K1, K2):
    return ((K0 - 1) * (2 * K1 - 1) + (K1 - 1)) * (2 * K2 - 1) + (K2 - 1)


@triton.jit
def bias_tile(bias_ptr, qidx, kidx, center, size, KEYS_FIRST: tl.constexpr):
    """The relative bias of every (query, key) pair of a tile pair, in log2 units, and the
    pairs' table indices: ``[queries, keys]``, or ``[keys, queries]`` with ``KEYS_FIRST``.
    ``bias_ptr`` points at the head's table entry of offset 0 (``center`` entries into its
    ``size``). The indices are exact for every attended pair (the dQ kernel adds dRPB there).

    Loaded for every pair, also for tiles that need the window mask: the index is clamped
    into the head's table, so a pair outside the windows reads some entry of it, and the
    mask replaces its score afterwards. Loading it before the mask branch instead of inside
    it keeps the bias in the scores' register layout: a load under the branch was laid out
    for itself and the scores converted to that layout through shared memory, which made
    the loop over key tiles 1.7x longer (NAT-Tiny stage 1 forward on sm_90: 624 instructions
    per tile pair with RPB vs 363 without; see ``aot.loop_instructions``). The kernels call it
    before the score product: gathered after it, the same forward loop took 557, gathered
    before, 518."""
    if KEYS_FIRST:
        idx = kidx[:, None] - qidx[None, :]
    else:
        idx = kidx[None, :] - qidx[:, None]
    idx = tl.minimum(tl.maximum(idx, -center), size - 1 - center)
    return tl.load(bias_ptr + idx).to(tl.float32) * 1.4426950408889634, idx


@triton.jit
def apply_mask(s, inside, j0, j1, j2, ws0, wl0, ws1, wl1, ws2, wl2, ND: tl.constexpr,
               KEYS_FIRST: tl.constexpr):
    """Sets pairs outside the windows to ``-inf`` in scores ``s`` (``[queries, keys]``, or
    ``[keys, queries]`` with ``KEYS_FIRST``); a key tile ``inside`` every window of the
    query tile skips it. Only this elementwise work sits under the runtime branch: the
    kernels keep their loads and dots outside it, which is what lets Triton
    software-pipeline the loads (``num_stages``)."""
    if not inside:
        if KEYS_FIRST:
            valid = window_mask(j0[:, None], j1[:, None], j2[:, None], ws0[None, :], wl0[None, :],
                                ws1[None, :], wl1[None, :], ws2[None, :], wl2[None, :], ND)
        else:
            valid = window_mask(j0[None, :], j1[None, :], j2[None, :], ws0[:, None], wl0[:, None],
                                ws1[:, None], wl1[:, None], ws2[:, None], wl2[:, None], ND)
        s = tl.where(valid, s, float("-inf"))
    return s
