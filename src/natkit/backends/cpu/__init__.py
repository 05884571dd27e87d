"""Fused CPU neighborhood attention (backend name ``"cpu"``).

A C++ kernel compiled at first use (``_build.py``; source and algorithm in ``_source.py``):
no tensor of ``N x K`` scores or gathered keys exists in the forward (scores live in SIMD
registers, a chunk of at most 8 keys at a time, merged by an online softmax); the
log-sum-exp is saved and the backward recomputes the probabilities (FlashAttention-2
style) with O(N * head_dim) extra memory. Multithreaded over ``(batch, kv_head)`` pairs
and, when there are fewer than ``MIN_TASKS`` pairs, over blocks of rows, with
``at::parallel_for`` (respects ``torch.set_num_threads``; results are bitwise independent
of the thread count). q, k, v may be strided views (e.g. unbound from one qkv
projection). float16/bfloat16 inputs are computed in float32 (converted on entry, output
cast back); float64 is left to the portable backend, which computes it exactly.
The kernels are torch custom ops with fake versions, so ``torch.compile`` traces them.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ..._checks import NAParams
from ..._flops import register_flop_formula
from ..._window import window_1d
from .. import Backend, second_order
from . import _build

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tables(p: NAParams) -> tuple[list[torch.Tensor], list[int]]:
    """Per dimension (padded to 3-D with size-1 leading dims) an ``int32[5, L]`` table:
    first key, key count, ``i div d``, first query attending the key, query count; and the
    flat ``[k0, d0, k1, d1, k2, d2]``."""
    pad = 3 - p.ndim
    dims = [(1, 1, 1, 1, False)] * pad + list(zip(p.spatial, p.kernel_size, p.stride,
                                                  p.dilation, p.is_causal))
    tables, kd = [], []
    for length, k, s, d, causal in dims:
        first, count, pos = window_1d(length, k, s, d, causal)
        qlo = torch.zeros(length, dtype=torch.long)
        qcnt = torch.zeros(length, dtype=torch.long)
        # The queries attending key j form an interval of j's dilation group (window
        # starts and ends are monotone in the query position).
        for g in range(min(d, length)):
            qi = torch.arange(g, length, d)
            start_g = (first[qi] - g) // d
            end_g = start_g + count[qi]
            kj = torch.arange(len(qi))
            lo = torch.searchsorted(end_g, kj, right=True)
            hi = torch.searchsorted(start_g, kj, right=True) - 1
            n = (hi - lo + 1).clamp_min(0)
            qlo[qi] = (lo.clamp(0, len(qi) - 1)) * d + g
            qcnt[qi] = n
        tables.append(torch.stack([first, count, pos, qlo, qcnt]).to(torch.int32).contiguous())
        kd += [k, d]
    return tables, kd


_TABLE_CACHE: dict = {}


def _cached_tables(p: NAParams):
    key = (p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal)
    hit = _TABLE_CACHE.get(key)
    if hit is None:
        if len(_TABLE_CACHE) > 256:
            _TABLE_CACHE.clear()
        hit = _TABLE_CACHE[key] = _tables(p)
    return hit


# Work is split into at least this many tasks (when the input is big enough), whatever the
# thread count, so that the results never depend on the number of threads.
MIN_TASKS = 16
MIN_BLOCK_TOKENS = 1024


def _blocks(p: NAParams, lanes: int) -> int:
    """Blocks per (batch, kv_head): rows of the grid (or SIMD tiles of a 1-D row)."""
    pairs = p.batch * p.kv_heads
    if pairs >= MIN_TASKS:
        return 1
    rows = math.prod(p.spatial[:-1])
    units = rows if rows > 1 else -(-p.spatial[-1] // lanes)
    unit_tokens = p.num_tokens / units
    most = max(1, int(units // max(1, math.ceil(MIN_BLOCK_TOKENS / unit_tokens))))
    return max(1, min(-(-MIN_TASKS // pairs), most))


def _strided(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``t`` as float32 and its (batch, token, head) strides. Strided views are used as they
    are (no copy) when head_dim is contiguous and the spatial dims flatten with one token
    stride, as for q, k, v unbound from one qkv projection; anything else is copied."""
    t = t.to(torch.float32)
    sizes, strides = t.shape, t.stride()
    ok = strides[-1] == 1 or sizes[-1] == 1
    for i in range(1, t.dim() - 3):  # spatial dims but the last
        if sizes[i] > 1 and strides[i] != strides[i + 1] * sizes[i + 1]:
            ok = False
    if not ok:
        t = t.contiguous()
        strides = t.stride()
    return t, [strides[0], strides[-3], strides[-2]]


# A task works through its block in sub-blocks of about this many query tokens, each with
# slabs holding only the sub-block and its neighbors: scratch memory follows the sub-block
# and the neighborhood's reach, not the grid's size. A sub-block spans at least
# SLAB_REACHES reaches, so the neighbors that two sub-blocks both load are a small share of
# the copying (a 3-D or widely dilated neighborhood reaches across most of its grid: there
# the slabs hold most of it anyway).
SLAB_TOKENS = 4096
SLAB_REACHES = 8


def _sub_block_tokens(p: NAParams) -> int:
    reach, inner = 0, 1  # how far a neighborhood spans in flattened tokens
    for size, k, d in zip(reversed(p.spatial), reversed(p.kernel_size), reversed(p.dilation)):
        reach += (k - 1) * d * inner
        inner *= size
    return min(max(SLAB_TOKENS, SLAB_REACHES * reach), p.num_tokens)  # fits the kernel's int


def _geometry(p: NAParams, strides: list[int]) -> list[int]:
    spatial = (1,) * (3 - p.ndim) + tuple(p.spatial)
    return [p.batch, *spatial, p.heads, p.kv_heads, p.head_dim, *strides, _sub_block_tokens(p)]


def _rpb_table(rpb: torch.Tensor, p: NAParams) -> torch.Tensor:
    return (rpb.to(torch.float32) * (1 / math.log(2))).contiguous().view(p.heads, -1)


# The kernels are torch custom ops (with shape-only "fake" versions and a registered
# backward), so that torch.compile(fullgraph=True) traces through them. NAParams travels
# as a flat int list.
def _encode(p: NAParams) -> list[int]:
    return [p.ndim, p.batch, p.heads, p.kv_heads, p.head_dim, p.num_extra, int(p.has_rpb),
            *p.spatial, *p.kernel_size, *p.stride, *p.dilation, *map(int, p.is_causal)]


def _decode(cfg: list[int], scale: float) -> NAParams:
    nd, b, h, hk, d, e, has_rpb = cfg[:7]
    dims = [tuple(cfg[7 + i * nd: 7 + (i + 1) * nd]) for i in range(5)]
    return NAParams(spatial=dims[0], kernel_size=dims[1], stride=dims[2], dilation=dims[3],
                    is_causal=tuple(bool(c) for c in dims[4]), scale=scale, batch=b, heads=h,
                    kv_heads=hk, head_dim=d, num_extra=e, has_rpb=bool(has_rpb))


def _prepare(query, key, value, rpb, extra_k, extra_v, p):
    mod = _build.load()
    tables, kd = _cached_tables(p)
    (q, qs), (k, ks), (v, vs) = (_strided(t) for t in (query, key, value))
    table = _rpb_table(rpb, p) if rpb is not None else None
    ek = extra_k.to(torch.float32).contiguous() if extra_k is not None else None
    ev = extra_v.to(torch.float32).contiguous() if extra_v is not None else None
    return mod, (q, k, v, table, ek, ev, tables, kd, p.scale, _blocks(p, mod.lanes()),
                 _geometry(p, qs + ks + vs))


@torch.library.custom_op("natkit::cpu_na_forward", mutates_args=())
def _forward_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                rpb: Optional[torch.Tensor], extra_k: Optional[torch.Tensor],
                extra_v: Optional[torch.Tensor], cfg: list[int],
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, N, H, D], lse [B, N, H])``, both float32."""
    p = _decode(cfg, scale)
    mod, args = _prepare(query, key, value, rpb, extra_k, extra_v, p)
    out, lse = mod.na_forward(*args)
    return out, lse


@_forward_op.register_fake
def _(query, key, value, rpb, extra_k, extra_v, cfg, scale):
    p = _decode(cfg, scale)
    return (query.new_empty(p.batch, p.num_tokens, p.heads, p.head_dim, dtype=torch.float32),
            query.new_empty(p.batch, p.num_tokens, p.heads, dtype=torch.float32))


@torch.library.custom_op("natkit::cpu_na_backward", mutates_args=())
def _backward_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 rpb: Optional[torch.Tensor], extra_k: Optional[torch.Tensor],
                 extra_v: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                 grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], rpb_grad: bool,
                 cfg: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor]:
    """float32 ``(dq, dk, dv, drpb, dek, dev)``; an absent input's gradient, and ``drpb``
    without ``rpb_grad`` (a frozen bias skips its accumulation), is an empty tensor. (A
    fixed tuple of tensors, not a list: PyTorch's generic batching fallback, which
    ``autograd.grad(is_grads_batched=True)`` needs, handles only tensor returns.)"""
    p = _decode(cfg, scale)
    mod, (q, k, v, table, ek, ev, tables, kd, scale_, nblk, geo) = _prepare(
        query, key, value, rpb, extra_k, extra_v, p)
    g = grad_out.to(torch.float32).contiguous().view(out.shape)
    gl = None if grad_lse is None else grad_lse.to(torch.float32).contiguous()
    dq, dk, dv, drpb, dek, dev = mod.na_backward(q, k, v, table, ek, ev, tables, kd, scale_,
                                                 out, lse, g, gl, nblk, geo, rpb_grad)
    return (dq, dk, dv, *(q.new_empty(0) if g is None else g.sum(0) for g in (drpb, dek, dev)))


@_backward_op.register_fake
def _(query, key, value, rpb, extra_k, extra_v, out, lse, grad_out, grad_lse, rpb_grad, cfg,
      scale):
    p = _decode(cfg, scale)
    def empty(*shape):
        return query.new_empty(shape, dtype=torch.float32)
    kv = (p.batch, p.num_tokens, p.kv_heads, p.head_dim)
    extra = (0,) if extra_k is None else tuple(extra_k.shape)
    return (empty(p.batch, p.num_tokens, p.heads, p.head_dim), empty(*kv), empty(*kv),
            empty(p.heads, rpb[0].numel()) if rpb is not None and rpb_grad else empty(0),
            empty(*extra),
            empty(*extra))


def _setup_context(ctx, inputs, output):
    query, key, value, rpb, extra_k, extra_v, cfg, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, rpb, extra_k, extra_v, out, lse)
    ctx.cfg, ctx.scale = cfg, scale


def _backward(ctx, grad_out, grad_lse):
    query, key, value, rpb, extra_k, extra_v, out, lse = ctx.saved_tensors
    if second_order.recorded():  # create_graph=True: gradients autograd can differentiate
        return (*second_order.backward(_decode(ctx.cfg, ctx.scale),
                                       (query, key, value, rpb, extra_k, extra_v), grad_out,
                                       grad_lse), None, None)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    rpb_grad = rpb is not None and ctx.needs_input_grad[3]
    grads = _backward_op(query, key, value, rpb, extra_k, extra_v, out, lse, grad_out,
                         grad_lse, rpb_grad, ctx.cfg, ctx.scale)
    inputs = (query, key, value, rpb if rpb_grad else None, extra_k, extra_v)
    return (*(None if t is None else g.view(t.shape).to(t.dtype)
              for g, t in zip(grads, inputs)), None, None)


torch.library.register_autograd("natkit::cpu_na_forward", _backward, setup_context=_setup_context)
# FlopCounterMode: both ops end with (cfg, scale)
register_flop_formula(torch.ops.natkit.cpu_na_forward, lambda *a: _decode(*a[-2:]), False)
register_flop_formula(torch.ops.natkit.cpu_na_backward, lambda *a: _decode(*a[-2:]), True)


def na_cpu(query, key, value, p: NAParams, rpb=None, additional_keys=None,
           additional_values=None):
    """Fused CPU neighborhood attention; returns ``(out, lse)`` (lse float32)."""
    out, lse = _forward_op(query, key, value, rpb, additional_keys, additional_values,
                           _encode(p), p.scale)
    return out.view(query.shape).to(query.dtype), lse.view(query.shape[:-1])


def can_run(p: NAParams, query: torch.Tensor, rpb, requires_grad: bool) -> Optional[str]:
    """None if the fused CPU kernel can run this call, else why not (one sentence)."""
    if os.environ.get("NATKIT_DISABLE_CPU_KERNEL", "0") not in ("", "0"):
        return "the fused CPU kernel is disabled by NATKIT_DISABLE_CPU_KERNEL"
    if query.device.type != "cpu":
        return f"the fused CPU kernel needs CPU tensors, got device {query.device}"
    if query.dtype not in _DTYPES:
        return (f"the fused CPU kernel computes in float32 and accepts float32/float16/bfloat16; "
                f"dtype {query.dtype} runs on the portable backend")
    if p.num_tokens * max(p.heads, p.kv_heads) * p.head_dim >= 2**31:
        return "the input is too large for the fused CPU kernel's 32-bit indexing"
    if torch.compiler.is_compiling():
        # Building is not traceable: the custom op builds on its first run instead.
        return _build.known_error()
    return _build.build_error()


BACKEND = Backend("cpu", "fused C++ CPU kernel, compiled at first use (O(N*head_dim) memory)",
                  can_run, na_cpu, custom_ops=True)
