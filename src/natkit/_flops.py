"""FLOPs of neighborhood attention, as PyTorch's FLOP counter reports them for the fused ops.

The convention is FlashAttention's and ``torch.utils.flop_counter``'s for SDPA: the matrix
products over the (query, key) pairs the softmax covers, 2 FLOPs per multiply-add. Forward:
two products (``Q K^T`` and ``P V``), ``4 * pairs * head_dim``; backward: five (the scores
recomputed, ``dP``, ``dV``, ``dQ``, ``dK``), ``10 * pairs * head_dim``. Pairs are counted
exactly: each query's neighborhood (shorter at causal borders) plus the extra tokens. The
count is the model's, independent of how a backend tiles the work.
"""

from __future__ import annotations

import math

from ._checks import NAParams
from ._window import window_1d


def attended_pairs(p: NAParams) -> int:
    """(query, key) pairs per batch element and head: neighborhoods plus extra tokens.

    A query's neighborhood is the product of its per-dimension windows, so the sum over
    the grid factors into per-dimension sums of window lengths."""
    neighborhood = math.prod(
        int(window_1d(n, k, s, d, c)[1].sum())
        for n, k, s, d, c in zip(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal))
    return neighborhood + p.num_tokens * p.num_extra


def na_flops(p: NAParams, backward: bool = False) -> int:
    """FLOPs of the forward (or of the backward) of the call ``p``."""
    per_pair = 10 if backward else 4
    return per_pair * p.batch * p.heads * p.head_dim * attended_pairs(p)


def register_flop_formula(op, params, backward: bool) -> None:
    """Lets ``torch.utils.flop_counter.FlopCounterMode`` count a backend's custom op:
    ``params(*args)`` rebuilds the call's ``NAParams`` from the op's arguments (the counter
    passes tensors as their shapes)."""
    from torch.utils.flop_counter import register_flop_formula as register

    register(op)(lambda *args, out_shape=None, **kwargs: na_flops(params(*args), backward))
