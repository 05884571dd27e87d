"""The specification in plain PyTorch: a dense ``N x N`` mask built from the SPEC formula.

This is the tests' oracle. It is exact in any floating dtype (float64 included) and
favors obviousness over speed and memory: never use it on large inputs.
"""

from __future__ import annotations

import math

import torch

from .._checks import NAParams
from .._window import dense_mask_1d


def dense_mask(p: NAParams, device=None) -> torch.Tensor:
    """``bool[N, N]`` over flattened tokens: query ``n`` attends key ``m``."""
    mask = torch.ones((), dtype=torch.bool, device=device)
    for length, k, s, d, c in zip(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal):
        m = dense_mask_1d(length, k, s, d, c, device)
        # interleave: result dims (q0, k0, q1, k1, ...) then regroup queries/keys
        mask = (mask[..., None, None] & m)
    nd = p.ndim
    perm = [2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)]
    return mask.permute(perm).reshape(p.num_tokens, p.num_tokens)


def dense_bias(p: NAParams, rpb: torch.Tensor) -> torch.Tensor:
    """``[heads, N, N]`` relative positional bias, ``rpb[h, j'_0 - i'_0 + k_0 - 1, ...]``."""
    index = []
    for dim, (length, k, d) in enumerate(zip(p.spatial, p.kernel_size, p.dilation)):
        pos = torch.arange(length, device=rpb.device) // d
        rel = (pos[None, :] - pos[:, None] + k - 1).clamp(0, 2 * k - 2)  # clamp: masked anyway
        shape = [1] * (2 * p.ndim)
        shape[dim], shape[p.ndim + dim] = length, length
        index.append(rel.view(shape))
    bias = rpb[(slice(None), *index)]
    return bias.reshape(rpb.shape[0], p.num_tokens, p.num_tokens)


def na_reference(query, key, value, p: NAParams, rpb=None, additional_keys=None,
                 additional_values=None, upcast: bool = True, key_mask=None):
    """Reference neighborhood attention; returns ``(out, lse)``.

    ``upcast`` computes in float32 for half inputs (the output is cast back);
    ``upcast=False`` runs every step in the input dtype, the low-precision baseline of
    the tests' tolerance rule. ``key_mask`` (``bool[N]``) additionally excludes keys,
    used to specify the modules' padding.
    """
    dtype = query.dtype
    compute = torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else dtype
    b, n, hq, hk = p.batch, p.num_tokens, p.heads, p.kv_heads
    group = hq // hk
    q = query.reshape(b, n, hq, -1).to(compute).transpose(1, 2)              # b hq n d
    k = key.reshape(b, n, hk, -1).to(compute).repeat_interleave(group, 2).transpose(1, 2)
    v = value.reshape(b, n, hk, -1).to(compute).repeat_interleave(group, 2).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * p.scale                               # b hq n n
    if rpb is not None:
        logits = logits + dense_bias(p, rpb.to(compute))
    mask = dense_mask(p, query.device)
    if key_mask is not None:
        mask = mask & key_mask.reshape(1, n)
    logits = logits.masked_fill(~mask, -math.inf)
    if additional_keys is not None:
        ek = additional_keys.to(compute).repeat_interleave(group, 2).transpose(1, 2)
        ev = additional_values.to(compute).repeat_interleave(group, 2).transpose(1, 2)
        logits = torch.cat([logits, (q @ ek.transpose(-1, -2)) * p.scale], dim=-1)
        v = torch.cat([v, ev], dim=-2)
    lse = torch.logsumexp(logits.float() if compute != torch.float64 else logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    out = (probs @ v).transpose(1, 2)                                          # b n hq d
    out = out.reshape(*query.shape[:-1], v.shape[-1]).to(dtype)
    lse = lse.transpose(1, 2).reshape(query.shape[:-1])
    return out, lse.float() if lse.dtype != torch.float64 else lse
