"""Host side: geometry normalization, kernel launchers, the ``torch.library`` custom ops.

``natkit::triton_na_fwd`` returns ``(out, lse)``; ``natkit::triton_na_bwd`` returns every
gradient (placeholders of zero elements for absent optional inputs, since custom ops cannot
return ``None``). Both have fake implementations, and autograd is registered on the forward
op, so ``torch.compile(fullgraph=True)`` treats the kernels as opaque graph nodes.

Precision: inputs are read in their dtype; every dot accumulates in fp32, softmax runs in
fp32. For float32 inputs the dots use TF32 only when ``torch.backends.cuda.matmul.allow_tf32``
is set (PyTorch's own matmul policy); otherwise IEEE fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

import torch
import triton

from ..._checks import NAParams
from ..._flops import register_flop_formula
from .. import second_order
from . import configs, work
from .backward import (delta_kernel, na_bwd_dkdv_extra_kernel, na_bwd_dkdv_kernel,
                       na_bwd_dq_kernel, na_bwd_drpb_kernel)
from .forward import na_fwd_kernel

LOG2E = 1.4426950408889634

# Tests set this: output buffers start as NaN, so any element a kernel fails to write shows.
POISON = False


def _empty(shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class Geometry:
    """A call normalized to 3-D (leading size-1 dims: kernel 1, stride 1, dilation 1)."""

    ndim: int
    L: tuple[int, int, int]
    K: tuple[int, int, int]
    S: tuple[int, int, int]
    D: tuple[int, int, int]
    C: tuple[bool, bool, bool]

    @property
    def group_lengths(self) -> tuple[int, int, int]:
        """Longest dilation-group length per dimension, ``ceil(L / d)``."""
        return tuple(-(-l // d) for l, d in zip(self.L, self.D))

    def slots(self, tile) -> tuple[int, int, int]:
        """Tile slots per dimension: ``dilation * tiles per group``."""
        return tuple(d * -(-g // t) for d, g, t in zip(self.D, self.group_lengths, tile))

    def key(self) -> tuple:
        return (self.ndim, tuple(configs.bucket(g) for g in self.group_lengths), self.K,
                self.S, self.C, tuple(d > 1 for d in self.D))


def geometry(query, kernel_size, dilation, stride, is_causal) -> Geometry:
    nd = query.dim() - 3
    pad = 3 - nd
    return Geometry(nd, (1,) * pad + tuple(query.shape[1:1 + nd]),
                    (1,) * pad + tuple(kernel_size), (1,) * pad + tuple(stride),
                    (1,) * pad + tuple(dilation), (False,) * pad + tuple(bool(c) for c in is_causal))


def _strides(t: torch.Tensor, nd: int) -> tuple:
    """``(batch, s0, s1, s2, heads, dim)`` strides of a ``[B, *spatial, H, D]`` tensor."""
    st = t.stride()
    return (st[0],) + (0,) * (3 - nd) + tuple(st[1:1 + nd]) + (st[-2], st[-1])


def _extra_strides(t: Optional[torch.Tensor]) -> tuple:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=20)


def _tune_key(g: Geometry, q, has_rpb, has_extra, groups) -> tuple:
    """The autotune cache's key: what changes the compiled kernels or their speed (the
    device: GPUs differ in shared memory; the precision: TF32 or IEEE products)."""
    return g.key() + (configs.block_d(q.shape[-1]), q.dtype, _precision(q.dtype),
                      str(q.device), has_rpb, has_extra, groups > 1)


def _common_args(g: Geometry):
    return (*g.L, *g.K, *g.S, *g.D)


def _grid(g: Geometry, tile, programs: int):
    """Tile slots per dimension, their count, and the flat grid of ``programs`` programs
    per slot (``window.program_ids``)."""
    slots = g.slots(tile)
    nslots = math.prod(slots)
    return slots, nslots, (nslots * programs,)


def _big(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a batch element of some tensor spans 2^31 elements or more: the kernels then
    compute offsets in int64 (``window.program_ids``), else in int32 (fewer registers)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))
               >= 2**31 - 1 for t in tensors if t is not None and t.numel() > 0)


# Launch arguments, one function per kernel: ``(grid, args, options)`` for
# ``kernel[grid](*args, **options)``. ``aot.py`` compiles from the same arguments.
def fwd_args(q, k, v, out, lse, rpb, ek, ev, g: Geometry, cfg: configs.TileConfig, scale):
    b, h, hd, hk, nd = q.shape[0], q.shape[-2], q.shape[-1], k.shape[-2], g.ndim
    slots, nslots, grid = _grid(g, cfg.q_tile, b * h)
    args = (q, k, v, out, lse, rpb if rpb is not None else q,
            ek if ek is not None else q, ev if ev is not None else q,
            *_strides(q, nd), *_strides(k, nd), *_strides(v, nd), *_strides(out, nd),
            *_extra_strides(ek), *_extra_strides(ev),
            *_common_args(g), slots[1], slots[2], nslots, h, h // hk,
            0 if ek is None else ek.shape[1], scale * LOG2E,
            *g.C, g.ndim, *cfg.q_tile, *cfg.k_tile, hd, configs.block_d(hd),
            rpb is not None, ek is not None, _precision(q.dtype), _big(q, k, v, out, ek, ev))
    return grid, args, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def dq_slots(g: Geometry, cfg: configs.TileConfig) -> int:
    """Query-tile slots of the dQ kernel (its atomics spread over ``min(64, slots)`` copies)."""
    return math.prod(g.slots(cfg.q_tile))


def dq_args(q, k, v, dout, lse, delta, dq, rpb, drpb, ncopy, ek, ev, g: Geometry,
            cfg: configs.TileConfig, scale):
    """``drpb`` (``[ncopy, heads, table]`` fp32, zeroed) makes the kernel add the rpb
    gradient with atomics (scheme ``"fused"``); ``None`` leaves it to the dRPB kernel."""
    b, h, hd, hk, nd = q.shape[0], q.shape[-2], q.shape[-1], k.shape[-2], g.ndim
    slots, nslots, grid = _grid(g, cfg.q_tile, b * h)
    args = (q, k, v, dout, lse, delta, dq, rpb if rpb is not None else q,
            drpb if drpb is not None else q,
            ek if ek is not None else q, ev if ev is not None else q,
            *_strides(q, nd), *_strides(k, nd), *_strides(v, nd), *_strides(dout, nd),
            *_strides(dq, nd), *_extra_strides(ek), *_extra_strides(ev),
            *_common_args(g), slots[1], slots[2], nslots, h, h // hk,
            0 if ek is None else ek.shape[1], scale * LOG2E, scale,
            ncopy, *g.C, g.ndim, *cfg.q_tile, *cfg.k_tile, hd, configs.block_d(hd),
            rpb is not None, drpb is not None, ek is not None, _precision(q.dtype),
            _big(q, k, v, dout, dq, ek, ev))
    return grid, args, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@dataclass(frozen=True)
class DrpbLayout:
    """The dRPB kernel's launch. Per dimension, the shifts that some query tile meets: each
    one's key-tile offset from the query tile (``offsets``) and the query-tile slots that
    meet it (``slots``, ``work.drpb_slots_1d``); a 3-D shift is one of each, and its work
    items are the batch elements x the products of its slots. They split ``splits`` ways per
    shift and head; the atomic variant adds into ``ncopy`` private copies of the gradient
    table (program ``pid`` into copy ``pid % ncopy``)."""

    offsets: tuple[tuple[int, ...], ...]
    slots: tuple[tuple[tuple[int, ...], ...], ...]
    splits: int

    @property
    def shifts(self) -> int:
        return math.prod(len(o) for o in self.offsets)

    @property
    def programs(self) -> int:
        """Programs per head."""
        return self.shifts * self.splits

    @property
    def ncopy(self) -> int:
        return min(64, self.programs)


def drpb_layout(g: Geometry, cfg: configs.TileConfig, batch: int, heads: int,
                sms: int) -> DrpbLayout:
    """Shifts from ``configs.drpb_shifts``, those no tile meets dropped. The shifts an
    interior query tile meets hold almost every item (the others only border tiles), so
    the splits are sized by those: about 16 warps per SM of ``sms``."""
    offsets, slots = [], []
    for dim in zip(g.L, g.K, g.S, g.D, g.C, cfg.q_tile, cfg.k_tile):
        met = [(o, s) for o, s in work.drpb_slots_1d(*dim) if s]
        offsets.append(tuple(o for o, _ in met))
        slots.append(tuple(s for _, s in met))
    busy = math.prod(-(-(bq + k - 1) // bk) for k, bq, bk in zip(g.K, cfg.q_tile, cfg.k_tile))
    items = batch * math.prod(g.slots(cfg.q_tile))
    splits = max(1, min(items, -(-16 * sms // (cfg.num_warps * busy * heads))))
    return DrpbLayout(tuple(offsets), tuple(slots), splits)


@lru_cache(maxsize=256)
def _slot_table(layout: DrpbLayout, device: torch.device) -> torch.Tensor:
    """``layout``'s shifts as the kernel reads them: ``[3, max shifts, 2 + max count]``
    int32, per dimension and shift its offset, its count of slots, those slots."""
    width = 2 + max(len(s) for dim in layout.slots for s in dim)
    nmax = max(len(o) for o in layout.offsets)
    table = torch.zeros(3, nmax, width, dtype=torch.int32)
    for d, (offsets, slots) in enumerate(zip(layout.offsets, layout.slots)):
        for i, (o, s) in enumerate(zip(offsets, slots)):
            table[d, i, :2 + len(s)] = torch.tensor([o, len(s), *s])
    return table.to(device)


@lru_cache(maxsize=256)
def _partial_index(layout: DrpbLayout, cfg: configs.TileConfig, kernel: tuple,
                   device: torch.device) -> torch.Tensor:
    """For the dRPB kernel's partial tiles (shift-major, then query and key token of the
    tile): each pair's index into the flat bias table, or the table size for pairs whose
    offset lies outside it (a slot that is dropped)."""
    def coords(tile):
        r = torch.arange(math.prod(tile))
        return torch.stack([r // (tile[1] * tile[2]), (r // tile[2]) % tile[1], r % tile[2]], 1)
    u, v = coords(cfg.q_tile), coords(cfg.k_tile)
    grid = torch.cartesian_prod(*(torch.tensor(o) for o in layout.offsets)).view(-1, 3)
    rel = grid[:, None, None, :] + v[None, None, :, :] - u[None, :, None, :]  # [S, BM, BN, 3]
    k0, k1, k2 = kernel
    inside = (rel.abs() < torch.tensor(kernel)).all(-1)
    idx = (((rel[..., 0] + k0 - 1) * (2 * k1 - 1) + rel[..., 1] + k1 - 1) * (2 * k2 - 1)
           + rel[..., 2] + k2 - 1)
    table = (2 * k0 - 1) * (2 * k1 - 1) * (2 * k2 - 1)
    return torch.where(inside, idx, table).flatten().to(device)


def fold_partials(partial: torch.Tensor, layout: DrpbLayout, cfg: configs.TileConfig,
                  kernel: tuple, heads: int) -> torch.Tensor:
    """The rpb gradient ``[heads, table]`` from the dRPB kernel's partial tiles
    (``[programs * heads, tile pairs]``): a sum over each shift's splits, then an
    ``index_add`` into the table, both deterministic (``index_add`` on CUDA under
    ``torch.use_deterministic_algorithms``)."""
    tile = partial.view(layout.shifts, layout.splits, heads, -1).sum(1)
    flat = tile.permute(1, 0, 2).reshape(heads, -1)
    table = math.prod(2 * k - 1 for k in kernel)
    out = flat.new_zeros(heads, table + 1)
    out.index_add_(1, _partial_index(layout, cfg, tuple(kernel), partial.device), flat)
    return out[:, :table]


def drpb_args(q, k, v, dout, lse, delta, rpb, drpb, layout: DrpbLayout, g: Geometry,
              cfg: configs.TileConfig, scale, partial: bool = False):
    """``drpb``: ``[ncopy, heads, table]`` fp32, zeroed (atomics), or with ``partial``
    ``[programs * heads, tile pairs]`` fp32 (``fold_partials``)."""
    h, hd, hk, nd = q.shape[-2], q.shape[-1], k.shape[-2], g.ndim
    grid = (layout.programs, h)
    slots = _slot_table(layout, q.device)
    args = (q, k, v, dout, lse, delta, rpb, drpb, *_strides(q, nd), *_strides(k, nd),
            *_strides(v, nd), *_strides(dout, nd), *_common_args(g),
            slots, slots.shape[1], slots.shape[2], q.shape[0], len(layout.offsets[1]),
            len(layout.offsets[2]), layout.splits, h, h // hk, scale * LOG2E,
            layout.ncopy, *g.C, g.ndim, *cfg.q_tile, *cfg.k_tile, hd, configs.block_d(hd),
            _precision(q.dtype), partial, _big(q, k, v, dout))
    return grid, args, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another


def dkdv_args(q, k, v, dout, lse, delta, dk, dv, rpb, g: Geometry, cfg: configs.TileConfig,
              scale):
    b, h, hd, hk, nd = q.shape[0], q.shape[-2], q.shape[-1], k.shape[-2], g.ndim
    slots, nslots, grid = _grid(g, cfg.k_tile, b * hk)
    args = (q, k, v, dout, lse, delta, dk, dv, rpb if rpb is not None else q,
            *_strides(q, nd), *_strides(k, nd), *_strides(v, nd), *_strides(dout, nd),
            *_strides(dk, nd), *_strides(dv, nd),
            *_common_args(g), slots[1], slots[2], nslots, h, hk, h // hk,
            scale * LOG2E, scale, *g.C, g.ndim, *cfg.q_tile, *cfg.k_tile, hd, configs.block_d(hd),
            rpb is not None, _precision(q.dtype), _big(q, k, v, dout, dk, dv))
    return grid, args, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def forward(q, k, v, rpb, ek, ev, g: Geometry, scale: float):
    h, hk = q.shape[-2], k.shape[-2]
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty(q.shape[:-1], torch.float32, q.device)

    def launch(cfg: configs.TileConfig):
        grid, args, options = fwd_args(q, k, v, out, lse, rpb, ek, ev, g, cfg, scale)
        na_fwd_kernel[grid](*args, **options)

    cfg = configs.choose("fwd", _tune_key(g, q, rpb is not None, ek is not None, h // hk),
                         g.ndim, configs.block_d(q.shape[-1]), g.group_lengths, q.device.type,
                         lambda c: _bench(lambda: launch(c)), rpb is not None, q.dtype)
    launch(cfg)
    return out, lse


def backward(dout, dlse, q, k, v, out, lse, rpb, ek, ev, g: Geometry, scale: float,
             rpb_grad: bool = True):
    """Every gradient; the rpb gradient only with ``rpb_grad`` (else a zero-element
    placeholder: a frozen bias skips its atomics or the dRPB kernel)."""
    b, h, hd = q.shape[0], q.shape[-2], q.shape[-1]
    hk = k.shape[-2]
    nd = g.ndim
    block_d = configs.block_d(hd)
    n_extra = 0 if ek is None else ek.shape[1]
    prec = _precision(q.dtype)
    # torch.use_deterministic_algorithms: no autotuning (configs), the rpb gradient summed
    # without atomics; every other kernel has one writer per output element
    deterministic = torch.are_deterministic_algorithms_enabled()

    dout = dout.contiguous()
    rows = out.numel() // hd
    delta = _empty(lse.shape, torch.float32, q.device)
    block_r = 64
    delta_kernel[(triton.cdiv(rows, block_r),)](
        out, dout, dlse.contiguous() if dlse is not None else lse, delta, rows, hd, block_d,
        block_r, dlse is not None)

    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    table = math.prod(2 * kk - 1 for kk in g.K)
    key = _tune_key(g, q, rpb is not None, ek is not None, h // hk)
    drpb_buf = [None]

    def zeroed_drpb(ncopy: int) -> torch.Tensor:
        drpb_buf[0] = torch.zeros((ncopy, h, table), dtype=torch.float32, device=q.device)
        return drpb_buf[0]

    def launch_dkdv(cfg: configs.TileConfig):
        grid, args, options = dkdv_args(q, k, v, dout, lse, delta, dk, dv, rpb, g, cfg, scale)
        na_bwd_dkdv_kernel[grid](*args, **options)

    def launch_dq(cfg: configs.TileConfig, atomics: bool):
        # private copies bound atomic contention; a copy per program at most
        ncopy = min(64, dq_slots(g, cfg)) if atomics else 1
        grid, args, options = dq_args(q, k, v, dout, lse, delta, dq, rpb,
                                      zeroed_drpb(ncopy) if atomics else None, ncopy, ek, ev,
                                      g, cfg, scale)
        na_bwd_dq_kernel[grid](*args, **options)

    def launch_drpb(cfg: configs.TileConfig):
        layout = drpb_layout(g, cfg, b, h, _sms(q.device))
        if deterministic:  # every program stores its tile; summed in a fixed order after
            partial = _empty((layout.programs * h, cfg.block_m * cfg.block_n), torch.float32,
                             q.device)
            grid, args, options = drpb_args(q, k, v, dout, lse, delta, rpb, partial, layout,
                                            g, cfg, scale, partial=True)
            na_bwd_drpb_kernel[grid](*args, **options)
            drpb_buf[0] = fold_partials(partial, layout, cfg, g.K, h)[None]
            return
        grid, args, options = drpb_args(q, k, v, dout, lse, delta, rpb,
                                        zeroed_drpb(layout.ncopy), layout, g, cfg, scale)
        na_bwd_drpb_kernel[grid](*args, **options)

    def tuned(kind, sub_key, launch):
        cfg = configs.choose(kind, sub_key, nd, block_d, g.group_lengths, q.device.type,
                             lambda c: _bench(lambda: launch(c)), rpb is not None, q.dtype)
        launch(cfg)

    def dq_pass(scheme):  # dQ, and the rpb gradient by ``scheme`` (None: no rpb)
        atomics = scheme == "fused"
        tuned("dq", key + (atomics,), lambda c: launch_dq(c, atomics))
        if scheme == "separate":
            tuned("drpb", key, launch_drpb)

    def time_scheme(scheme):
        dq_pass(scheme)  # tunes its configs first
        return _bench(lambda: dq_pass(scheme))

    scheme = None
    if rpb is not None and rpb_grad:
        scheme = configs.drpb_scheme(key, q.device.type, lambda: time_scheme("fused"),
                                     lambda: time_scheme("separate"), deterministic)
    dq_pass(scheme)
    tuned("dkdv", key, launch_dkdv)

    drpb = (drpb_buf[0].sum(0).view(rpb.shape).to(rpb.dtype) if scheme is not None
            else q.new_empty(0))
    if ek is not None:
        dek = _empty(ek.shape, ek.dtype, ek.device)
        dev = _empty(ev.shape, ev.dtype, ev.device)
        block_m, block_n = (64, 64) if block_d <= 128 else (32, 32)
        tiles = triton.cdiv(n_extra, block_n)
        na_bwd_dkdv_extra_kernel[(tiles * b * hk,)](
            q, ek, ev, dout, lse, delta, dek, dev,
            *_strides(q, nd), *_extra_strides(ek), *_extra_strides(ev), *_strides(dout, nd),
            *_extra_strides(dek), *_extra_strides(dev),
            *g.L, tiles, h, hk, h // hk, n_extra, scale * LOG2E, scale,
            block_m, block_n, hd, block_d, prec, _big(q, ek, ev, dout, dek, dev))
    else:
        dek, dev = q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, drpb, dek, dev


# ---------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("natkit::triton_na_fwd", mutates_args=())
def na_fwd_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              rpb: Optional[torch.Tensor], additional_keys: Optional[torch.Tensor],
              additional_values: Optional[torch.Tensor], kernel_size: List[int],
              dilation: List[int], stride: List[int], is_causal: List[bool],
              scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    g = geometry(query, kernel_size, dilation, stride, is_causal)
    return forward(query, key, value, rpb, additional_keys, additional_values, g, scale)


@na_fwd_op.register_fake
def _(query, key, value, rpb, additional_keys, additional_values, kernel_size, dilation,
      stride, is_causal, scale):
    return (query.new_empty(query.shape),
            query.new_empty(query.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("natkit::triton_na_bwd", mutates_args=())
def na_bwd_op(dout: torch.Tensor, dlse: Optional[torch.Tensor], query: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              rpb: Optional[torch.Tensor], additional_keys: Optional[torch.Tensor],
              additional_values: Optional[torch.Tensor], kernel_size: List[int],
              dilation: List[int], stride: List[int], is_causal: List[bool],
              scale: float, rpb_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    g = geometry(query, kernel_size, dilation, stride, is_causal)
    return backward(dout, dlse, query, key, value, out, lse, rpb, additional_keys,
                    additional_values, g, scale, rpb_grad)


@na_bwd_op.register_fake
def _(dout, dlse, query, key, value, out, lse, rpb, additional_keys, additional_values,
      kernel_size, dilation, stride, is_causal, scale, rpb_grad):
    def like(t):
        return t.new_empty(t.shape) if t is not None else query.new_empty(0)
    return (like(query), like(key), like(value), like(rpb if rpb_grad else None),
            like(additional_keys), like(additional_values))


def _setup_context(ctx, inputs, output):
    query, key, value, rpb, ek, ev, kernel_size, dilation, stride, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, rpb, ek, ev)
    ctx.params = (kernel_size, dilation, stride, is_causal, scale)


def _backward(ctx, dout, dlse):
    query, key, value, out, lse, rpb, ek, ev = ctx.saved_tensors
    if second_order.recorded():  # create_graph=True: gradients autograd can differentiate
        p = _params(query.shape, key.shape, rpb, None if ek is None else ek.shape,
                    *ctx.params)
        return (*second_order.backward(p, (query, key, value, rpb, ek, ev), dout, dlse),
                None, None, None, None, None)
    if dout is None:
        dout = torch.zeros_like(out)
    rpb_grad = rpb is not None and ctx.needs_input_grad[3]
    dq, dk, dv, drpb, dek, dev = na_bwd_op(dout, dlse, query, key, value, out, lse, rpb, ek,
                                           ev, *ctx.params, rpb_grad)
    return (dq, dk, dv, drpb if rpb_grad else None, dek if ek is not None else None,
            dev if ev is not None else None, None, None, None, None, None)


na_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _params(query, key, rpb, additional_keys, kernel_size, dilation, stride, is_causal,
            scale):
    """The ``NAParams`` of an op call whose tensors are given by their shapes (as
    FlopCounterMode passes them; rpb only has to be None or not)."""
    batch, *spatial, heads, head_dim = query
    return NAParams(spatial=tuple(spatial), kernel_size=tuple(kernel_size),
                    dilation=tuple(dilation), stride=tuple(stride),
                    is_causal=tuple(is_causal), scale=scale, batch=batch, heads=heads,
                    kv_heads=key[-2], head_dim=head_dim,
                    num_extra=additional_keys[1] if additional_keys is not None else 0,
                    has_rpb=rpb is not None)


def _fwd_flop_params(query, key, value, rpb, ek, ev, *geometry):
    return _params(query, key, rpb, ek, *geometry)


def _bwd_flop_params(dout, dlse, query, key, value, out, lse, rpb, ek, ev, *geometry):
    return _params(query, key, rpb, ek, *geometry[:-1])  # the last: rpb_grad


register_flop_formula(torch.ops.natkit.triton_na_fwd, _fwd_flop_params, False)
register_flop_formula(torch.ops.natkit.triton_na_bwd, _bwd_flop_params, True)
