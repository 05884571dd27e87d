"""Argument normalization and validation for the public API.

Every user-facing mistake is reported here as a ``TypeError`` or ``ValueError``
that names the argument and the value; backends receive normalized ``NAParams``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence, Union

import torch

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class NAParams:
    """Normalized, validated description of one neighborhood-attention call."""

    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    num_extra: int  # additional key/value tokens attended by every query
    has_rpb: bool

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def keys_per_query(self) -> int:
        return math.prod(self.kernel_size)


def is_int(x) -> bool:
    """An integer (int, numpy integer, ...) that is not a bool."""
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    """A real number (int, float, numpy scalar, ...) that is not a bool."""
    return isinstance(x, Real) and not isinstance(x, bool)


def show(value) -> str:
    """``repr(value)`` for error messages, with ints (also in tuples and lists) through
    ``int()``: torch.compile cannot format the symbolic ints it passes for sizes that vary
    between calls, and would lose the message."""
    if isinstance(value, (tuple, list)):
        inner = ", ".join(show(v) for v in value)
        if isinstance(value, list):
            return f"[{inner}]"
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return f"{int(value)}" if is_int(value) else repr(value)


def _tuple(name: str, value, nd: int, kind: type) -> tuple:
    """``value`` as a tuple of ``nd`` entries of ``kind`` (an int or a bool)."""
    if isinstance(value, (Integral, bool)):
        items = (value,)
    elif isinstance(value, (tuple, list)):
        items = tuple(value)
    else:
        raise TypeError(f"{name} must be {kind.__name__} or a tuple of {nd} "
                        f"{kind.__name__}s, got {value!r}")
    if len(items) == 1:
        items = items * nd
    if len(items) != nd:
        raise ValueError(f"{name} must have {nd} entries (one per spatial dimension), "
                         f"got {show(value)}")
    for item in items:
        ok = isinstance(item, bool) if kind is bool else is_int(item)
        if not ok:
            raise TypeError(f"{name} entries must be {kind.__name__}s, got {value!r}")
    return tuple(map(kind, items))


def _check_tensor(name: str, t, layout: str, may_be_zero: tuple[int, ...] = (0,)) -> None:
    """Type, dtype, layout and rank of ``t``; only the dims ``may_be_zero`` may have size 0."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, "
                        f"float64), got dtype {t.dtype}")
    if t.layout != torch.strided or t.is_nested:
        got = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {got}")
    rank = layout.count(",") + 1
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims {layout}, got shape {tuple(t.shape)}")
    dims = layout.strip("[]").split(", ")
    zero = [dims[i] for i, n in enumerate(t.shape) if n == 0 and i not in may_be_zero]
    if zero:
        allowed = " and ".join(dims[i] for i in may_be_zero)
        raise ValueError(f"{name} is empty: size 0 in {', '.join(zero)} (shape "
                         f"{tuple(t.shape)}); only {allowed} may be 0")


def check_inputs(nd: int, query, key, value, kernel_size: IntOrTuple, dilation: IntOrTuple,
                 stride: IntOrTuple, is_causal: BoolOrTuple, rpb, scale,
                 additional_keys, additional_values) -> NAParams:
    """Validates every argument of ``na{nd}d`` and returns the normalized ``NAParams``."""
    layout = "[batch, " + "".join(f"size{i}, " for i in range(nd)) + "heads, head_dim]"
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t, layout)
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if key.shape != value.shape:
        raise ValueError(f"key and value shapes differ: {tuple(key.shape)} vs {tuple(value.shape)}")
    batch, *spatial, heads, head_dim = query.shape
    if tuple(key.shape[:-2]) != (batch, *spatial):
        raise ValueError(f"key batch/spatial dims {tuple(key.shape[:-2])} differ from query's "
                         f"{(batch, *spatial)}")
    if key.shape[-1] != head_dim:
        raise ValueError(f"key head_dim {key.shape[-1]} differs from query head_dim {head_dim}")
    kv_heads = key.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads "
                         f"({kv_heads})")

    kernel = _tuple("kernel_size", kernel_size, nd, int)
    dil = _tuple("dilation", dilation, nd, int)
    strd = _tuple("stride", stride, nd, int)
    causal = _tuple("is_causal", is_causal, nd, bool)
    for dim, (length, k, d, s) in enumerate(zip(spatial, kernel, dil, strd)):
        if k < 2:
            raise ValueError(f"kernel_size must be >= 2 in every dimension, got "
                             f"{show(kernel_size)}")
        if d < 1:
            raise ValueError(f"dilation must be >= 1 in every dimension, got {show(dilation)}")
        if not 1 <= s <= k:
            raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size, got stride "
                             f"{show(stride)} with kernel_size {show(kernel_size)}")
        if k * d > length:
            raise ValueError(
                f"kernel_size * dilation ({k} * {d} = {k * d}) exceeds the input size {length} "
                f"in spatial dimension {dim} (input spatial shape {tuple(spatial)}); pad the "
                f"input or use a smaller kernel/dilation (the NeighborhoodAttention modules pad "
                f"automatically)")

    if rpb is not None:
        if not isinstance(rpb, torch.Tensor):
            raise TypeError(f"rpb must be a torch.Tensor or None, got {type(rpb).__name__}")
        if rpb.dtype not in FLOAT_DTYPES:
            raise TypeError(f"rpb must be a floating tensor, got dtype {rpb.dtype}")
        if rpb.layout != torch.strided:
            raise TypeError(f"rpb must be a dense (strided) tensor, got layout {rpb.layout}")
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"rpb requires an odd kernel_size in every dimension, got "
                             f"{show(kernel_size)}")
        if any(causal):
            raise ValueError(f"rpb is not supported with causal masking (is_causal={is_causal!r})")
        expected = (heads, *(2 * k - 1 for k in kernel))
        if tuple(rpb.shape) != expected:
            raise ValueError(f"rpb must have shape [heads, 2*kernel_size-1, ...] = {expected}, "
                             f"got {tuple(rpb.shape)}")
        if rpb.device != query.device:
            raise ValueError(f"rpb is on {rpb.device} but query is on {query.device}")

    scale = head_dim ** -0.5 if scale is None else check_scale(scale, query.dtype)

    num_extra = 0
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is not None:
        for name, t in (("additional_keys", additional_keys),
                        ("additional_values", additional_values)):
            _check_tensor(name, t, "[batch, n_extra, kv_heads, head_dim]", may_be_zero=(0, 1))
            if t.dtype != query.dtype:
                raise TypeError(f"{name} dtype {t.dtype} differs from query dtype {query.dtype}")
            if t.device != query.device:
                raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
            if (t.shape[0], t.shape[2], t.shape[3]) != (batch, kv_heads, head_dim):
                raise ValueError(f"{name} must have shape [batch={batch}, n_extra, "
                                 f"kv_heads={kv_heads}, head_dim={head_dim}], got "
                                 f"{tuple(t.shape)}")
        if additional_keys.shape != additional_values.shape:
            raise ValueError(f"additional_keys and additional_values shapes differ: "
                             f"{tuple(additional_keys.shape)} vs {tuple(additional_values.shape)}")
        num_extra = additional_keys.shape[1]

    return NAParams(spatial=tuple(spatial), kernel_size=kernel, dilation=dil, stride=strd,
                    is_causal=causal, scale=float(scale), batch=batch, heads=heads,
                    kv_heads=kv_heads, head_dim=head_dim, num_extra=num_extra,
                    has_rpb=rpb is not None)


def check_scale(scale, dtype: torch.dtype):
    """``scale`` as a Python (or, under torch.compile, symbolic) float, checked to be finite
    in the precision the kernels compute logits in for ``dtype`` inputs."""
    if not is_real(scale):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    if not isinstance(scale, (int, float, torch.SymInt, torch.SymFloat)):
        try:  # numpy and other scalars: compare in float64, not in the scalar's own width
            scale = float(scale)  # (a numpy float16 would overflow the float32 limit to inf)
        except OverflowError:
            raise ValueError(f"scale must be finite, got {scale!r}") from None
    # half and single precision inputs compute in float32: the scale must fit there
    limit = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
    # comparisons only (False for NaN, exact for ints beyond float range): they also hold
    # for the symbolic float torch.compile passes when a scale varies between calls
    if not -limit <= scale <= limit:
        try:  # through float(): torch.compile cannot format a symbolic value directly
            shown = float(scale)
        except OverflowError:  # an int beyond float range
            shown = scale
        raise ValueError(f"scale must be finite and at most {limit:.4g} in magnitude for "
                         f"{dtype} inputs, got {shown!r}")
    return scale
