"""Forward kernel: fused neighborhood attention with online softmax (exp2, fp32 accumulation).

Grid: ``query-tile slots * batch * heads`` (``window.program_ids``). A program owns one
multi-dimensional query tile (``BQ0 x BQ1 x BQ2`` tokens of one dilation group), walks the
key tiles of its neighborhoods' bounding box (``window.key_box`` per dimension), then the
extra key/value tokens, and writes the output and the log-sum-exp. Key tiles inside every
neighborhood of the tile run the unmasked inner step; only boundary tiles pay for the
window mask.
"""

import triton
import triton.language as tl

from .window import (apply_mask, bias_tile, box_tile, key_box, program_ids, query_windows,
                     rpb_center, rpb_flat, tile_coords, tile_slot, wide)


@triton.jit
def _softmax_step(acc, m_i, l_i, qk, v, PRECISION: tl.constexpr):
    """Online-softmax update with the scores ``qk`` (log2 units; ``-inf`` = masked)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row so far
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def na_fwd_kernel(
        Q, K, V, O, LSE, RPB, EK, EV,
        sqb, sq0, sq1, sq2, sqh, sqd,
        skb, sk0, sk1, sk2, skh, skd,
        svb, sv0, sv1, sv2, svh, svd,
        sob, so0, so1, so2, soh, sod,
        sekb, sekn, sekh, sekd,
        sevb, sevn, sevh, sevd,
        L0, L1, L2, K0, K1, K2, S0, S1, S2, D0, D1, D2,
        NT1, NT2, NSLOTS, H, G, E, qk_scale,
        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, ND: tl.constexpr,
        BQ0: tl.constexpr, BQ1: tl.constexpr, BQ2: tl.constexpr,
        BK0: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_RPB: tl.constexpr, HAS_EXTRA: tl.constexpr, PRECISION: tl.constexpr,
        BIG: tl.constexpr):
    BLOCK_M: tl.constexpr = BQ0 * BQ1 * BQ2
    BLOCK_N: tl.constexpr = BK0 * BK1 * BK2
    pid, bh = program_ids(NSLOTS, BIG)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // G
    g0, g1, g2, Lg0, Lg1, Lg2, a0, a1, a2 = tile_slot(
        pid, NT1, NT2, L0, L1, L2, D0, D1, D2, BQ0, BQ1, BQ2)
    i0, i1, i2 = tile_coords(a0, a1, a2, BQ0, BQ1, BQ2)
    # per-query windows (masked tiles); invalid queries get an empty window
    qvalid, ws0, wl0, ws1, wl1, ws2, wl2 = query_windows(i0, i1, i2, Lg0, Lg1, Lg2, K0, K1, K2,
                                                         S0, S1, S2, C0, C1, C2)
    dd = wide(tl.arange(0, BLOCK_D), BIG)
    dmask = dd < HEAD_DIM
    r0 = i0 * D0 + g0
    r1 = i1 * D1 + g1
    r2 = i2 * D2 + g2
    q = tl.load(Q + b * sqb + h * sqh + r0[:, None] * sq0 + r1[:, None] * sq1 + r2[:, None] * sq2
                + dd[None, :] * sqd, mask=qvalid[:, None] & dmask[None, :], other=0.0)

    qidx = tl.where(qvalid, rpb_flat(i0, i1, i2, K1, K2), -1)
    # the tile's key box per dimension, and the keys every query of the tile attends
    lo0, nk0, flo0, fhi0, full0 = key_box(a0, Lg0, K0, S0, C0, BQ0, BK0)
    lo1, nk1, flo1, fhi1, full1 = key_box(a1, Lg1, K1, S1, C1, BQ1, BK1)
    lo2, nk2, flo2, fhi2, full2 = key_box(a2, Lg2, K2, S2, C2, BQ2, BK2)
    qfull = full0 & full1 & full2

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
    center = rpb_center(K0, K1, K2)
    bias_ptr = RPB + h * table + center
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for t in range(0, nk0 * nk1 * nk2):
        c0, c1, c2 = box_tile(t, lo0, lo1, lo2, nk1, nk2, BK0, BK1, BK2)
        j0, j1, j2 = tile_coords(c0, c1, c2, BK0, BK1, BK2)
        kidx = rpb_flat(j0, j1, j2, K1, K2)
        koff = (j0 * D0 + g0) * sk0 + (j1 * D1 + g1) * sk1 + (j2 * D2 + g2) * sk2
        voff = (j0 * D0 + g0) * sv0 + (j1 * D1 + g1) * sv1 + (j2 * D2 + g2) * sv2
        inside = qfull & ((c0 >= flo0) & (c0 + BK0 <= fhi0) & (c1 >= flo1) & (c1 + BK1 <= fhi1)
                          & (c2 >= flo2) & (c2 + BK2 <= fhi2))
        # loads outside the branch: Triton software-pipelines them (num_stages) only there
        kvalid = (j0 < Lg0) & (j1 < Lg1) & (j2 < Lg2)
        kT = tl.load(k_base + koff[None, :] + dd[:, None] * skd,
                     mask=kvalid[None, :] & dmask[:, None], other=0.0)
        v = tl.load(v_base + voff[:, None] + dd[None, :] * svd,
                    mask=kvalid[:, None] & dmask[None, :], other=0.0)
        if HAS_RPB:  # loaded before the product (``bias_tile``)
            bias, _ = bias_tile(bias_ptr, qidx, kidx, center, table, False)
            qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale + bias
        else:
            qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        qk = apply_mask(qk, inside, j0, j1, j2, ws0, wl0, ws1, wl1, ws2, wl2, ND, False)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, v, PRECISION)
    if HAS_EXTRA:
        ek_base = EK + b * sekb + hk * sekh
        ev_base = EV + b * sevb + hk * sevh
        for e0 in range(0, E, BLOCK_N):
            n = wide(e0 + tl.arange(0, BLOCK_N), BIG)
            evalid = n < E
            kT = tl.load(ek_base + n[None, :] * sekn + dd[:, None] * sekd,
                         mask=evalid[None, :] & dmask[:, None], other=0.0)
            v = tl.load(ev_base + n[:, None] * sevn + dd[None, :] * sevd,
                        mask=evalid[:, None] & dmask[None, :], other=0.0)
            qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
            qk = tl.where(evalid[None, :] & qvalid[:, None], qk, float("-inf"))
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, v, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    o_ptrs = (O + b * sob + h * soh + r0[:, None] * so0 + r1[:, None] * so1 + r2[:, None] * so2
              + dd[None, :] * sod)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=qvalid[:, None] & dmask[None, :])
    tok = (r0 * L1 + r1) * L2 + r2
    tl.store(LSE + (b * L0 * L1 * L2 + tok) * H + h, lse, mask=qvalid)
