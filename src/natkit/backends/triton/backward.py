"""Backward kernels: delta preprocess, dQ (+ fused dRPB), dRPB, dK/dV, dK/dV of extra tokens.

Scheme (as in FlashAttention-2 / Triton's fused-attention tutorial): probabilities are
recomputed from the saved log-sum-exp; ``delta = rowsum(dO * O) - dlse`` folds the
gradient of the returned log-sum-exp in (``d lse / d s = P``).

- ``na_bwd_dq_kernel``, grid ``query-tile slots * batch * heads``: the forward's key box;
  ``dQ = scale * dS K``; with ``DRPB_ATOMICS`` (rpb-gradient scheme "fused", ``configs``)
  ``dRPB += dS`` by fp32 atomics, one per attended pair, into ``NCOPY`` private copies of
  the table (program ``pid`` uses copy ``pid % NCOPY``), so at most
  ``ceil(programs / NCOPY)`` programs contend per address; the copies are summed on the host.
- ``na_bwd_drpb_kernel`` (scheme "separate"), grid ``(shifts * splits, heads)``: a pair's
  table index depends only on its offset ``j - i``, so for a key tile at a fixed offset
  from the query tile every query tile (and batch element) maps its pairs to the same
  indices. The kernel recomputes ``dS`` (two products) for each such tile pair, sums it
  in registers and adds once per pair of the tile at the end: atomics drop from one per
  attended pair to one per program and tile element. A shift's programs walk only the
  query tiles that reach its key tile (host-built lists, ``work.drpb_slots_1d``).
- ``na_bwd_dkdv_kernel``, grid ``key-tile slots * batch * kv_heads``: the inverse
  neighborhood (``window.query_box``) of every query head of the GQA group; deterministic,
  no atomics. ``dK = scale * dS^T Q``, ``dV = P^T dO``.
- ``na_bwd_dkdv_extra_kernel``, grid ``extra-token tiles * batch * kv_heads``: every query
  attends the extra tokens, so their gradient is a reduction over all queries.
"""

import triton
import triton.language as tl

from .window import (apply_mask, bias_tile, box_tile, key_box, program_ids, query_box,
                     query_windows, rpb_center, rpb_flat, slot_tile, tile_coords, tile_slot, wide,
                     win_end, win_start)


@triton.jit
def delta_kernel(O, DO, LSE_GRAD, DELTA, rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_R: tl.constexpr, HAS_LSE_GRAD: tl.constexpr):
    """``delta[r] = sum_d O[r, d] * dO[r, d] - dlse[r]`` over contiguous rows; grid ``cdiv(rows, BLOCK_R)``."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (dd < HEAD_DIM)[None, :]
    off = r.to(tl.int64)[:, None] * HEAD_DIM + dd[None, :]
    o = tl.load(O + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_LSE_GRAD:
        delta -= tl.load(LSE_GRAD + r, mask=r < rows, other=0.0)
    tl.store(DELTA + r, delta, mask=r < rows)


@triton.jit
def _row_stats(LSE, DELTA, b, r0, r1, r2, L0, L1, L2, H, h, valid):
    """The saved log-sum-exp (in log2 units) and delta of query rows ``(b, r*, h)``."""
    row = (b * L0 * L1 * L2 + (r0 * L1 + r1) * L2 + r2) * H + h
    return (tl.load(LSE + row, mask=valid, other=0.0) * 1.4426950408889634,
            tl.load(DELTA + row, mask=valid, other=0.0))


@triton.jit
def _dq_update(dq, s, dp, lse2, delta, k, PRECISION: tl.constexpr):
    """``dQ += dS K`` from scores ``s`` (log2 units, ``-inf`` outside the windows) and
    ``dP = dO V^T``; returns ``(dQ, dS, P)``."""
    p = tl.math.exp2(s - lse2[:, None])
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq, ds, p


@triton.jit
def na_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, RPB, DRPB, EK, EV,
        sqb, sq0, sq1, sq2, sqh, sqd,
        skb, sk0, sk1, sk2, skh, skd,
        svb, sv0, sv1, sv2, svh, svd,
        sdob, sdo0, sdo1, sdo2, sdoh, sdod,
        sdqb, sdq0, sdq1, sdq2, sdqh, sdqd,
        sekb, sekn, sekh, sekd,
        sevb, sevn, sevh, sevd,
        L0, L1, L2, K0, K1, K2, S0, S1, S2, D0, D1, D2,
        NT1, NT2, NSLOTS, H, G, E, qk_scale, scale, NCOPY,
        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, ND: tl.constexpr,
        BQ0: tl.constexpr, BQ1: tl.constexpr, BQ2: tl.constexpr,
        BK0: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_RPB: tl.constexpr, DRPB_ATOMICS: tl.constexpr, HAS_EXTRA: tl.constexpr,
        PRECISION: tl.constexpr, BIG: tl.constexpr):
    BLOCK_N: tl.constexpr = BK0 * BK1 * BK2
    pid, bh = program_ids(NSLOTS, BIG)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // G
    g0, g1, g2, Lg0, Lg1, Lg2, a0, a1, a2 = tile_slot(
        pid, NT1, NT2, L0, L1, L2, D0, D1, D2, BQ0, BQ1, BQ2)
    i0, i1, i2 = tile_coords(a0, a1, a2, BQ0, BQ1, BQ2)
    qvalid, ws0, wl0, ws1, wl1, ws2, wl2 = query_windows(i0, i1, i2, Lg0, Lg1, Lg2, K0, K1, K2,
                                                         S0, S1, S2, C0, C1, C2)
    dd = wide(tl.arange(0, BLOCK_D), BIG)
    dmask = dd < HEAD_DIM
    r0 = i0 * D0 + g0
    r1 = i1 * D1 + g1
    r2 = i2 * D2 + g2
    qm = qvalid[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + r0[:, None] * sq0 + r1[:, None] * sq1 + r2[:, None] * sq2
                + dd[None, :] * sqd, mask=qm, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + r0[:, None] * sdo0 + r1[:, None] * sdo1
                 + r2[:, None] * sdo2 + dd[None, :] * sdod, mask=qm, other=0.0)
    lse2, delta = _row_stats(LSE, DELTA, b, r0, r1, r2, L0, L1, L2, H, h, qvalid)
    qidx = tl.where(qvalid, rpb_flat(i0, i1, i2, K1, K2), -1)
    lo0, nk0, flo0, fhi0, full0 = key_box(a0, Lg0, K0, S0, C0, BQ0, BK0)
    lo1, nk1, flo1, fhi1, full1 = key_box(a1, Lg1, K1, S1, C1, BQ1, BK1)
    lo2, nk2, flo2, fhi2, full2 = key_box(a2, Lg2, K2, S2, C2, BQ2, BK2)
    qfull = full0 & full1 & full2

    table = (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
    center = rpb_center(K0, K1, K2)
    bias_ptr = RPB + h * table + center
    drpb_ptr = DRPB + ((pid % NCOPY) * H + h) * table + center
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BQ0 * BQ1 * BQ2, BLOCK_D], tl.float32)
    for t in range(0, nk0 * nk1 * nk2):
        c0, c1, c2 = box_tile(t, lo0, lo1, lo2, nk1, nk2, BK0, BK1, BK2)
        j0, j1, j2 = tile_coords(c0, c1, c2, BK0, BK1, BK2)
        kidx = rpb_flat(j0, j1, j2, K1, K2)
        koff = (j0 * D0 + g0) * sk0 + (j1 * D1 + g1) * sk1 + (j2 * D2 + g2) * sk2
        voff = (j0 * D0 + g0) * sv0 + (j1 * D1 + g1) * sv1 + (j2 * D2 + g2) * sv2
        kvalid = (j0 < Lg0) & (j1 < Lg1) & (j2 < Lg2)
        inside = qfull & ((c0 >= flo0) & (c0 + BK0 <= fhi0) & (c1 >= flo1) & (c1 + BK1 <= fhi1)
                          & (c2 >= flo2) & (c2 + BK2 <= fhi2))
        # loads outside the branch: Triton software-pipelines them (num_stages) only there
        k = tl.load(k_base + koff[:, None] + dd[None, :] * skd,
                    mask=kvalid[:, None] & dmask[None, :], other=0.0)
        vT = tl.load(v_base + voff[None, :] + dd[:, None] * svd,
                     mask=kvalid[None, :] & dmask[:, None], other=0.0)
        if HAS_RPB:  # loaded before the products (``bias_tile``)
            bias, bidx = bias_tile(bias_ptr, qidx, kidx, center, table, False)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        dp = tl.dot(do, vT, input_precision=PRECISION)
        qk = apply_mask(qk, inside, j0, j1, j2, ws0, wl0, ws1, wl1, ws2, wl2, ND, False)
        dq, ds, p = _dq_update(dq, qk, dp, lse2, delta, k, PRECISION)
        if DRPB_ATOMICS:  # dRPB += dS where a pair is attended (P > 0: window pairs whose
            # probability did not underflow; the others would add zero)
            tl.atomic_add(drpb_ptr + bidx, ds, mask=p > 0.0, sem="relaxed")
    if HAS_EXTRA:
        ek_base = EK + b * sekb + hk * sekh
        ev_base = EV + b * sevb + hk * sevh
        for e0 in range(0, E, BLOCK_N):
            n = wide(e0 + tl.arange(0, BLOCK_N), BIG)
            evalid = n < E
            k = tl.load(ek_base + n[:, None] * sekn + dd[None, :] * sekd,
                        mask=evalid[:, None] & dmask[None, :], other=0.0)
            vT = tl.load(ev_base + n[None, :] * sevn + dd[:, None] * sevd,
                         mask=evalid[None, :] & dmask[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            qk = tl.where(evalid[None, :] & qvalid[:, None], qk, float("-inf"))
            dp = tl.dot(do, vT, input_precision=PRECISION)
            dq, _, _ = _dq_update(dq, qk, dp, lse2, delta, k, PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + r0[:, None] * sdq0 + r1[:, None] * sdq1
             + r2[:, None] * sdq2 + dd[None, :] * sdqd, (dq * scale).to(DQ.dtype.element_ty), mask=qm)


@triton.jit
def na_bwd_drpb_kernel(
        Q, K, V, DO, LSE, DELTA, RPB, DRPB,
        sqb, sq0, sq1, sq2, sqh, sqd,
        skb, sk0, sk1, sk2, skh, skd,
        svb, sv0, sv1, sv2, svh, svd,
        sdob, sdo0, sdo1, sdo2, sdoh, sdod,
        L0, L1, L2, K0, K1, K2, S0, S1, S2, D0, D1, D2,
        SLOTS, NSMAX, ROW, BATCH, NS1, NS2, SPLITS, H, G, qk_scale, NCOPY,
        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, ND: tl.constexpr,
        BQ0: tl.constexpr, BQ1: tl.constexpr, BQ2: tl.constexpr,
        BK0: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        PARTIAL: tl.constexpr, BIG: tl.constexpr):
    """Program ``(shift * SPLITS + split, head)``: the key tile at one fixed offset from the
    query tile, over the work items ``split, split + SPLITS, ...`` of that shift: a batch
    element and a query tile that meets the key tile. ``SLOTS[d, s]`` (rows of ``ROW``
    int32) describes shift ``s`` of dimension ``d``: its offset, its count of tile slots,
    then those slots (``work.drpb_slots_1d``; only shifts that some tile meets have a row),
    so no program visits an item only to skip it. Every item's pairs have the same bias
    indices, so ``dS`` sums in registers; at the end the program adds its tile into
    ``DRPB`` (atomics, copy ``pid % NCOPY``), or with ``PARTIAL`` stores it to its own
    ``[BLOCK_M * BLOCK_N]`` row of ``DRPB`` for a deterministic sum on the host."""
    pid = tl.program_id(0)
    h = wide(tl.program_id(1), BIG)
    hk = h // G
    shift = pid // SPLITS
    row0 = SLOTS + (shift // (NS1 * NS2)) * ROW
    row1 = SLOTS + (NSMAX + (shift // NS2) % NS1) * ROW
    row2 = SLOTS + (2 * NSMAX + shift % NS2) * ROW
    o0 = tl.load(row0)
    o1 = tl.load(row1)
    o2 = tl.load(row2)
    n1 = tl.load(row1 + 1)
    n2 = tl.load(row2 + 1)
    per_b = tl.load(row0 + 1) * n1 * n2
    u0, u1, u2 = tile_coords(0, 0, 0, BQ0, BQ1, BQ2)  # query offsets in the tile
    v0, v1, v2 = tile_coords(o0, o1, o2, BK0, BK1, BK2)  # key offsets from the query tile
    table = (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
    center = rpb_center(K0, K1, K2)
    bias, _ = bias_tile(RPB + h * table + center, rpb_flat(u0, u1, u2, K1, K2),
                        rpb_flat(v0, v1, v2, K1, K2), center, table, False)
    dd = wide(tl.arange(0, BLOCK_D), BIG)
    dmask = dd < HEAD_DIM
    acc = tl.zeros([BQ0 * BQ1 * BQ2, BK0 * BK1 * BK2], tl.float32)
    for item in range(pid % SPLITS, BATCH * per_b, SPLITS):
        b = (item // per_b).to(tl.int64)
        t = item % per_b
        g0, Lg0, a0 = slot_tile(wide(tl.load(row0 + 2 + t // (n1 * n2)), BIG), L0, D0, BQ0)
        g1, Lg1, a1 = slot_tile(wide(tl.load(row1 + 2 + (t // n2) % n1), BIG), L1, D1, BQ1)
        g2, Lg2, a2 = slot_tile(wide(tl.load(row2 + 2 + t % n2), BIG), L2, D2, BQ2)
        i0 = a0 + u0
        i1 = a1 + u1
        i2 = a2 + u2
        j0 = a0 + v0
        j1 = a1 + v1
        j2 = a2 + v2
        qvalid, ws0, wl0, ws1, wl1, ws2, wl2 = query_windows(
            i0, i1, i2, Lg0, Lg1, Lg2, K0, K1, K2, S0, S1, S2, C0, C1, C2)
        kvalid = ((j0 >= 0) & (j0 < Lg0) & (j1 >= 0) & (j1 < Lg1) & (j2 >= 0) & (j2 < Lg2))
        r0 = i0 * D0 + g0
        r1 = i1 * D1 + g1
        r2 = i2 * D2 + g2
        k0 = j0 * D0 + g0
        k1 = j1 * D1 + g1
        k2 = j2 * D2 + g2
        qm = qvalid[:, None] & dmask[None, :]
        q = tl.load(Q + b * sqb + h * sqh + (r0 * sq0 + r1 * sq1 + r2 * sq2)[:, None]
                    + dd[None, :] * sqd, mask=qm, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + (r0 * sdo0 + r1 * sdo1 + r2 * sdo2)[:, None]
                     + dd[None, :] * sdod, mask=qm, other=0.0)
        k = tl.load(K + b * skb + hk * skh + (k0 * sk0 + k1 * sk1 + k2 * sk2)[:, None]
                    + dd[None, :] * skd, mask=kvalid[:, None] & dmask[None, :], other=0.0)
        vT = tl.load(V + b * svb + hk * svh + (k0 * sv0 + k1 * sv1 + k2 * sv2)[None, :]
                     + dd[:, None] * svd, mask=kvalid[None, :] & dmask[:, None], other=0.0)
        lse2, delta = _row_stats(LSE, DELTA, b, r0, r1, r2, L0, L1, L2, H, h, qvalid)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias
        qk = apply_mask(qk, False, j0, j1, j2, ws0, wl0, ws1, wl1, ws2, wl2, ND, False)
        p = tl.math.exp2(qk - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=PRECISION)
        acc += p * (dp - delta[:, None])
    # whether the pairs' offsets lie in the table in every dimension (the others are never
    # attended), and their table indices; computed after the loop to hold no registers in it
    in_table = ((tl.abs(v0[None, :] - u0[:, None]) < K0) & (tl.abs(v1[None, :] - u1[:, None]) < K1)
                & (tl.abs(v2[None, :] - u2[:, None]) < K2))
    if PARTIAL:
        pair = (tl.arange(0, BQ0 * BQ1 * BQ2)[:, None] * (BK0 * BK1 * BK2)
                + tl.arange(0, BK0 * BK1 * BK2)[None, :])
        tl.store(DRPB + (pid * H + h).to(tl.int64) * (BQ0 * BQ1 * BQ2 * BK0 * BK1 * BK2) + pair,
                 tl.where(in_table, acc, 0.0))
    else:
        bidx = rpb_flat(v0, v1, v2, K1, K2)[None, :] - rpb_flat(u0, u1, u2, K1, K2)[:, None]
        tl.atomic_add(DRPB + ((pid % NCOPY) * H + h) * table + center + bidx, acc,
                      mask=in_table & (acc != 0.0), sem="relaxed")


@triton.jit
def _dkdv_update(dk, dv, sT, k, v, q, do, lse2, delta, PRECISION: tl.constexpr):
    """``dV += P^T dO``, ``dK += dS^T Q`` from transposed scores ``sT`` (``[keys, queries]``,
    log2 units, ``-inf`` for pairs that are not attended)."""
    pT = tl.math.exp2(sT - lse2[None, :])
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def na_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, RPB,
        sqb, sq0, sq1, sq2, sqh, sqd,
        skb, sk0, sk1, sk2, skh, skd,
        svb, sv0, sv1, sv2, svh, svd,
        sdob, sdo0, sdo1, sdo2, sdoh, sdod,
        sdkb, sdk0, sdk1, sdk2, sdkh, sdkd,
        sdvb, sdv0, sdv1, sdv2, sdvh, sdvd,
        L0, L1, L2, K0, K1, K2, S0, S1, S2, D0, D1, D2,
        NT1, NT2, NSLOTS, H, HK, G, qk_scale, scale,
        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, ND: tl.constexpr,
        BQ0: tl.constexpr, BQ1: tl.constexpr, BQ2: tl.constexpr,
        BK0: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_RPB: tl.constexpr, PRECISION: tl.constexpr, BIG: tl.constexpr):
    BLOCK_N: tl.constexpr = BK0 * BK1 * BK2
    pid, bh = program_ids(NSLOTS, BIG)
    b = (bh // HK).to(tl.int64)
    hk = bh % HK
    g0, g1, g2, Lg0, Lg1, Lg2, c0, c1, c2 = tile_slot(
        pid, NT1, NT2, L0, L1, L2, D0, D1, D2, BK0, BK1, BK2)
    j0, j1, j2 = tile_coords(c0, c1, c2, BK0, BK1, BK2)
    kvalid = (j0 < Lg0) & (j1 < Lg1) & (j2 < Lg2)
    kidx = rpb_flat(j0, j1, j2, K1, K2)
    dd = wide(tl.arange(0, BLOCK_D), BIG)
    dmask = dd < HEAD_DIM
    s0 = j0 * D0 + g0
    s1 = j1 * D1 + g1
    s2 = j2 * D2 + g2
    km = kvalid[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + hk * skh + s0[:, None] * sk0 + s1[:, None] * sk1 + s2[:, None] * sk2
                + dd[None, :] * skd, mask=km, other=0.0)
    v = tl.load(V + b * svb + hk * svh + s0[:, None] * sv0 + s1[:, None] * sv1 + s2[:, None] * sv2
                + dd[None, :] * svd, mask=km, other=0.0)
    qlo0, nq0 = query_box(c0, Lg0, K0, S0, C0, BK0, BQ0)
    qlo1, nq1 = query_box(c1, Lg1, K1, S1, C1, BK1, BQ1)
    qlo2, nq2 = query_box(c2, Lg2, K2, S2, C2, BK2, BQ2)
    kin = (c0 + BK0 <= Lg0) & (c1 + BK1 <= Lg1) & (c2 + BK2 <= Lg2)

    table = (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
    center = rpb_center(K0, K1, K2)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for gi in range(0, G):
        h = hk * G + gi
        bias_ptr = RPB + h * table + center
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        for t in range(0, nq0 * nq1 * nq2):
            a0, a1, a2 = box_tile(t, qlo0, qlo1, qlo2, nq1, nq2, BQ0, BQ1, BQ2)
            i0, i1, i2 = tile_coords(a0, a1, a2, BQ0, BQ1, BQ2)
            r0 = i0 * D0 + g0
            r1 = i1 * D1 + g1
            r2 = i2 * D2 + g2
            qoff = r0 * sq0 + r1 * sq1 + r2 * sq2
            dooff = r0 * sdo0 + r1 * sdo1 + r2 * sdo2
            # every query of the tile valid and attending every key of the key tile
            sa0 = win_start(a0, Lg0, K0, S0, C0)
            sa1 = win_start(a1, Lg1, K1, S1, C1)
            sa2 = win_start(a2, Lg2, K2, S2, C2)
            inside = (kin & (a0 + BQ0 <= Lg0) & (a1 + BQ1 <= Lg1) & (a2 + BQ2 <= Lg2)
                      & (win_start(a0 + BQ0 - 1, Lg0, K0, S0, C0) <= c0)
                      & (win_start(a1 + BQ1 - 1, Lg1, K1, S1, C1) <= c1)
                      & (win_start(a2 + BQ2 - 1, Lg2, K2, S2, C2) <= c2)
                      & (c0 + BK0 <= win_end(a0, sa0, K0, C0))
                      & (c1 + BK1 <= win_end(a1, sa1, K1, C1))
                      & (c2 + BK2 <= win_end(a2, sa2, K2, C2)))
            # loads and dots outside the branch (software-pipelined); only masking depends on it
            qvalid, ws0, wl0, ws1, wl1, ws2, wl2 = query_windows(
                i0, i1, i2, Lg0, Lg1, Lg2, K0, K1, K2, S0, S1, S2, C0, C1, C2)
            qm = qvalid[:, None] & dmask[None, :]
            q = tl.load(q_base + qoff[:, None] + dd[None, :] * sqd, mask=qm, other=0.0)
            do = tl.load(do_base + dooff[:, None] + dd[None, :] * sdod, mask=qm, other=0.0)
            lse2, delta = _row_stats(LSE, DELTA, b, r0, r1, r2, L0, L1, L2, H, h, qvalid)
            qidx = tl.where(qvalid, rpb_flat(i0, i1, i2, K1, K2), -1)
            if HAS_RPB:  # loaded before the products (``bias_tile``)
                biasT, _ = bias_tile(bias_ptr, qidx, kidx, center, table, True)
                qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + biasT
            else:
                qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            qkT = apply_mask(qkT, inside, j0, j1, j2, ws0, wl0, ws1, wl1, ws2, wl2, ND, True)
            dk, dv = _dkdv_update(dk, dv, qkT, k, v, q, do, lse2, delta, PRECISION)
    tl.store(DK + b * sdkb + hk * sdkh + s0[:, None] * sdk0 + s1[:, None] * sdk1
             + s2[:, None] * sdk2 + dd[None, :] * sdkd, (dk * scale).to(DK.dtype.element_ty), mask=km)
    tl.store(DV + b * sdvb + hk * sdvh + s0[:, None] * sdv0 + s1[:, None] * sdv1
             + s2[:, None] * sdv2 + dd[None, :] * sdvd, dv.to(DV.dtype.element_ty), mask=km)


@triton.jit
def na_bwd_dkdv_extra_kernel(
        Q, EK, EV, DO, LSE, DELTA, DEK, DEV,
        sqb, sq0, sq1, sq2, sqh, sqd,
        sekb, sekn, sekh, sekd,
        sevb, sevn, sevh, sevd,
        sdob, sdo0, sdo1, sdo2, sdoh, sdod,
        sdekb, sdekn, sdekh, sdekd,
        sdevb, sdevn, sdevh, sdevd,
        L0, L1, L2, NSLOTS, H, HK, G, E, qk_scale, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        BIG: tl.constexpr):
    pid, bh = program_ids(NSLOTS, BIG)
    b = (bh // HK).to(tl.int64)
    hk = bh % HK
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    evalid = n < E
    dd = wide(tl.arange(0, BLOCK_D), BIG)
    dmask = dd < HEAD_DIM
    em = evalid[:, None] & dmask[None, :]
    k = tl.load(EK + b * sekb + hk * sekh + n[:, None] * sekn + dd[None, :] * sekd, mask=em, other=0.0)
    v = tl.load(EV + b * sevb + hk * sevh + n[:, None] * sevn + dd[None, :] * sevd, mask=em, other=0.0)
    NQ = L0 * L1 * L2
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for gi in range(0, G):
        h = hk * G + gi
        for m0 in range(0, NQ, BLOCK_M):
            m = wide(m0 + tl.arange(0, BLOCK_M), BIG)
            qvalid = m < NQ
            r0 = m // (L1 * L2)
            r1 = (m // L2) % L1
            r2 = m % L2
            qm = qvalid[:, None] & dmask[None, :]
            q = tl.load(Q + b * sqb + h * sqh + (r0 * sq0 + r1 * sq1 + r2 * sq2)[:, None]
                        + dd[None, :] * sqd, mask=qm, other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + (r0 * sdo0 + r1 * sdo1 + r2 * sdo2)[:, None]
                         + dd[None, :] * sdod, mask=qm, other=0.0)
            row = (b * NQ + m) * H + h
            lse2 = tl.load(LSE + row, mask=qvalid, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + row, mask=qvalid, other=0.0)
            qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            qkT = tl.where(evalid[:, None] & qvalid[None, :], qkT, float("-inf"))
            dk, dv = _dkdv_update(dk, dv, qkT, k, v, q, do, lse2, delta, PRECISION)
    tl.store(DEK + b * sdekb + hk * sdekh + n[:, None] * sdekn + dd[None, :] * sdekd,
             (dk * scale).to(DEK.dtype.element_ty), mask=em)
    tl.store(DEV + b * sdevb + hk * sdevh + n[:, None] * sdevn + dd[None, :] * sdevd,
             dv.to(DEV.dtype.element_ty), mask=em)
