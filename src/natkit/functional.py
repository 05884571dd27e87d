"""Public functional API: ``na1d``, ``na2d``, ``na3d`` share one generic entry.

Pipeline: validate and normalize arguments (``_checks``) -> choose a backend
(``backends.choose_backend``) -> run it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._checks import FLOAT_DTYPES, BoolOrTuple, IntOrTuple, check_inputs
from .backends import choose_backend


def neighborhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
                           stride: IntOrTuple = 1, is_causal: BoolOrTuple = False,
                           rpb: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                           additional_keys: Optional[torch.Tensor] = None,
                           additional_values: Optional[torch.Tensor] = None,
                           return_lse: bool = False, backend: Optional[str] = None):
    """Neighborhood attention over a 1-D, 2-D or 3-D token grid (dimension count from ``query``).

    Args:
        query: ``[batch, *spatial, heads, head_dim]``.
        key, value: ``[batch, *spatial, kv_heads, head_dim]``; ``heads`` must be a multiple
            of ``kv_heads`` (grouped-query / multi-query attention).
        kernel_size: neighborhood size per dimension (int or tuple), ``>= 2``; every query
            attends exactly ``kernel_size`` keys per dimension (windows shift inward at
            borders) unless causal.
        dilation: gap between attended keys per dimension; ``kernel_size * dilation`` must
            not exceed the spatial size.
        stride: queries of a ``stride``-block share one window, ``1 <= stride <= kernel_size``
            (``stride == kernel_size`` is blocked, window-like attention).
        is_causal: bool or per-dimension tuple; a causal query attends only keys at or
            before it.
        rpb: relative positional bias ``[heads, 2k_0-1, ...]`` (odd kernels, non-causal).
        scale: logit scale, default ``head_dim ** -0.5``.
        additional_keys, additional_values: ``[batch, n_extra, kv_heads, head_dim]`` tokens
            attended by every query, in one softmax with its neighborhood.
        return_lse: also return the log-sum-exp of the logits, ``[batch, *spatial, heads]``
            (float32; float64 for float64 inputs), for ``merge_attentions``.
        backend: ``None`` picks the fastest available backend (or the one
            ``natkit.use_backend`` set); or a name from ``natkit.available_backends()``.

    Returns:
        ``out`` shaped like ``query``, or ``(out, lse)`` when ``return_lse``.
    """
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    nd = query.dim() - 3
    if nd not in (1, 2, 3):
        raise ValueError(f"query must be [batch, *spatial, heads, head_dim] with 1 to 3 "
                         f"spatial dims, got shape {tuple(query.shape)}")
    return _run(nd, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale,
                additional_keys, additional_values, return_lse, backend)


def _run(nd, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale,
         additional_keys, additional_values, return_lse, backend):
    p = check_inputs(nd, query, key, value, kernel_size, dilation, stride, is_causal, rpb,
                     scale, additional_keys, additional_values)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    tensors = (query, key, value, rpb, additional_keys, additional_values)
    requires_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    impl = choose_backend(backend, p, query, rpb, requires_grad, tensors)
    if p.num_extra == 0:  # [batch, 0, ...] extra tokens: nothing more to attend
        additional_keys = additional_values = None
    if p.batch == 0:
        out, lse = _empty_result(query, tensors)
    else:
        out, lse = impl.forward(query, key, value, p, rpb, additional_keys, additional_values)
    return (out, lse) if return_lse else out


def _empty_result(query, tensors):
    """The output and log-sum-exp of an empty batch: empty tensors that still depend on every
    input, so that a backward pass gives every input a (zero) gradient, as with a real batch."""
    zero = sum(t.sum(dtype=torch.float32) for t in tensors if t is not None) * 0
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    out = query.new_zeros(query.shape) + zero.to(query.dtype)
    lse = query.new_zeros(query.shape[:-1], dtype=lse_dtype) + zero.to(lse_dtype)
    return out, lse


def _make_na(nd: int):
    def na(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None,
           scale=None, additional_keys=None, additional_values=None, return_lse=False,
           backend=None):
        return _run(nd, query, key, value, kernel_size, dilation, stride, is_causal, rpb,
                    scale, additional_keys, additional_values, return_lse, backend)

    na.__name__ = na.__qualname__ = f"na{nd}d"
    spatial = ("length", "height, width", "depth, height, width")[nd - 1]
    na.__doc__ = (f"{nd}-D neighborhood attention: ``query`` is ``[batch, {spatial}, heads, "
                  f"head_dim]``.\n\n" + neighborhood_attention.__doc__.split("\n\n", 1)[1])
    return na


na1d = _make_na(1)
na2d = _make_na(2)
na3d = _make_na(3)


def merge_attentions(outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]):
    """Merges attentions over disjoint key sets exactly, using their log-sum-exps.

    Args:
        outputs: tensors ``[batch, *tokens, heads, head_dim]`` of one shape.
        lses: matching log-sum-exps ``[batch, *tokens, heads]``.

    Returns:
        ``(out, lse)``: the attention over the union of the key sets (dtype of ``outputs``)
        and its log-sum-exp (float32, or float64 for float64 inputs). A part whose lse is
        ``-inf`` (no key attended) is left out whatever its output holds; where every part
        is, the output is 0 and the lse ``-inf``.
    """
    for name, seq in (("outputs", outputs), ("lses", lses)):
        if not isinstance(seq, (list, tuple)):  # a tensor would split along its batch dim
            raise TypeError(f"{name} must be a list or tuple of tensors, got "
                            f"{type(seq).__name__}")
    outputs, lses = list(outputs), list(lses)
    if len(outputs) != len(lses) or not outputs:
        raise ValueError(f"merge_attentions needs matching non-empty lists, got "
                         f"{len(outputs)} outputs and {len(lses)} lses")
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(l, torch.Tensor):
            raise TypeError(f"outputs[{i}] and lses[{i}] must be tensors")
        for name, t in ((f"outputs[{i}]", o), (f"lses[{i}]", l)):
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
            if t.device != outputs[0].device:
                raise ValueError(f"{name} is on {t.device}, outputs[0] on {outputs[0].device}")
        if o.dtype != outputs[0].dtype:
            raise TypeError(f"outputs[{i}] dtype {o.dtype} differs from outputs[0] dtype "
                            f"{outputs[0].dtype}")
        if o.dim() < 2:
            raise ValueError(f"outputs[{i}] must be [batch, *tokens, heads, head_dim], got "
                             f"shape {tuple(o.shape)}")
        if o.shape != outputs[0].shape:
            raise ValueError(f"outputs[{i}] shape {tuple(o.shape)} differs from outputs[0] "
                             f"shape {tuple(outputs[0].shape)}")
        if l.shape != o.shape[:-1]:
            raise ValueError(f"lses[{i}] must have shape {tuple(o.shape[:-1])}, got "
                             f"{tuple(l.shape)}")
    compute = torch.float64 if outputs[0].dtype == torch.float64 else torch.float32
    lse_all = torch.stack([l.to(compute) for l in lses])
    # A part with lse -inf attended no key: weight 0, and its output (possibly NaN) is not
    # read, nor is anything when every part is empty (output 0, lse -inf); no NaN reaches
    # the gradients either (logsumexp's backward over only -inf would be 0 * NaN).
    empty = lse_all == -math.inf
    none = empty.all(0)
    lse = torch.where(none, -math.inf, torch.logsumexp(torch.where(none, 0, lse_all), dim=0))
    weights = torch.exp(torch.where(empty, -math.inf,
                                    lse_all - torch.where(none, 0, lse)))
    out = sum(w[..., None] * torch.where(e[..., None], 0, o.to(compute))
              for w, e, o in zip(weights, empty, outputs))
    return out.to(outputs[0].dtype), lse
