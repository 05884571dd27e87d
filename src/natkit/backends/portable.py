"""Portable neighborhood attention in plain PyTorch ops (backend name ``"torch"``).

Runs on any device and differentiates through autograd. Each query gathers its
``K = prod(kernel_size)`` keys and values, so memory is ``O(N * K * head_dim)``: no
``N x N`` tensor. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import NAParams
from .._window import neighbor_table_1d


def neighbor_table(p: NAParams, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened per-query key slots: ``(keys[N, K], valid[N, K], rpb_index[N, K])``.

    ``rpb_index`` indexes the flattened ``[prod(2k-1)]`` bias table.
    """
    def outer(a, b, op):
        """Combines ``a: [Q..., K...]`` with ``b: [L, k]`` into ``[Q..., L, K..., k]``."""
        nq = a.dim() // 2
        a = a.reshape(*a.shape[:nq], 1, *a.shape[nq:], 1)
        return op(a, b.reshape(*([1] * nq), b.shape[0], *([1] * nq), b.shape[1]))

    keys = valid = rpb = torch.zeros((), dtype=torch.long, device=device)
    valid = valid == 0
    for length, k, s, d, c in zip(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal):
        kd, vd, rd = neighbor_table_1d(length, k, s, d, c, device)
        keys = outer(keys, kd, lambda a, b: a * length + b)
        valid = outer(valid, vd, torch.logical_and)
        rpb = outer(rpb, rd, lambda a, b: a * (2 * k - 1) + b)
    n, kk = p.num_tokens, p.keys_per_query
    return keys.reshape(n, kk), valid.reshape(n, kk), rpb.reshape(n, kk)


def na_portable(query, key, value, p: NAParams, rpb=None, additional_keys=None,
                additional_values=None, dropout_p: float = 0.0):
    """Returns ``(out, lse)``; ``dropout_p`` drops attention probabilities (modules only)."""
    dtype = query.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    b, n, hk = p.batch, p.num_tokens, p.kv_heads
    g = p.heads // hk
    keys, valid, rpb_index = neighbor_table(p, query.device)
    kk = keys.shape[1]

    q = query.reshape(b, n, hk, g, -1).to(compute)
    # cast before gathering: the gather's backward then sums dK/dV in ``compute`` precision
    k = key.reshape(b, n, hk, -1).to(compute)[:, keys.reshape(-1)].view(b, n, kk, hk, -1)
    v = value.reshape(b, n, hk, -1).to(compute)[:, keys.reshape(-1)].view(b, n, kk, hk, -1)
    logits = torch.einsum("bnhgd,bnkhd->bnhgk", q, k) * p.scale
    if rpb is not None:
        bias = rpb.to(compute).reshape(p.heads, -1)[:, rpb_index]            # hq n K
        logits = logits + bias.view(hk, g, n, kk).permute(2, 0, 1, 3)
    if any(p.is_causal):  # only causal windows have empty slots
        logits = logits.masked_fill(~valid.view(n, 1, 1, kk), -math.inf)
    if additional_keys is not None:
        ek = additional_keys.to(compute)
        logits = torch.cat([logits, torch.einsum("bnhgd,behd->bnhge", q, ek) * p.scale], -1)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)  # not exp(logits - lse): that loses the
    # softmax backward's cancellation when |lse| is large (an lse error of eps * |lse|)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = torch.einsum("bnhgk,bnkhd->bnhgd", probs[..., :kk], v)
    if additional_values is not None:
        out = out + torch.einsum("bnhge,behd->bnhgd", probs[..., kk:],
                                 additional_values.to(compute))
    out = out.reshape(*query.shape[:-1], -1).to(dtype)
    lse = lse.reshape(query.shape[:-1])
    return out, lse if lse.dtype == torch.float64 else lse.float()
