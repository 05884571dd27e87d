"""Portable neighborhood attention in plain PyTorch ops (backend name ``"torch"``).

Runs on any device and differentiates through autograd (double backward included).
Queries are cut into tiles (per dimension ``T`` consecutive queries of one dilation
group); a tile attends the ``W`` keys its windows span (per dimension ``W <= T + k - 1``)
through two batched matrix products and a mask, the tile-local form of NA that dense
hardware runs well. Memory is ``O(N * W^d)`` scores and ``O(N / T^d * W^d * head_dim)``
gathered keys: no ``N x N`` tensor and no ``N x K x head_dim`` gather. Half-precision
inputs are computed in float32.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from .._checks import NAParams
from .._window import group_window, window_1d
from . import transformed


@dataclass(frozen=True)
class TileTable:
    """One dimension's tiling. ``n`` tiles of ``T`` query slots and ``W`` key slots.

    ``queries[n, T]`` and ``keys[n, W]`` are token coordinates (padded slots repeat a
    real token: a padded query computes a real query's row again, a padded key is
    masked), ``mask[n, T, W]`` says which slots attend each other and ``rel[n, T, W]``
    is the bias-table index ``j' - i' + k - 1`` (clamped into the table where masked).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    rel: torch.Tensor


def default_chunk(device: torch.device) -> int:
    """Score elements computed at once. On the CPU 2^20 (4 MiB of float32): besides
    bounding the memory of a forward without autograd, buffers this small come from the
    allocator's reused heap instead of fresh pages faulted in on every call (about 2x at
    NAT-Tiny stage 1). Accelerators cache their memory; there larger chunks mean fewer
    launches."""
    return 1 << 20 if device.type == "cpu" else 1 << 24


def tile_size(kernel: int, ndim: int, length: int) -> int:
    """Queries per tile along a dimension of ``length`` (a dilation group's): about
    half a window, at least enough rows for a matrix product worth running (1-D 32,
    2-D 8 by 8, 3-D 4 by 4 by 4; at most 16 by 16 in 2-D), spread evenly over the
    tiles the length needs, so that the last tile is not mostly padding."""
    half = (kernel + 1) // 2
    target = {1: max(32, half), 2: min(16, max(8, half)), 3: 4}[ndim]
    count = -(-length // target)
    return -(-length // count)


def tile_table_1d(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                  tile: int, device=None) -> TileTable:
    """The tiling of one dimension: each dilation group cut into tiles of ``tile``
    consecutive queries; a tile's key box starts at its first query's window start
    (windows only move forward), as wide as any tile can need."""
    first, count, pos = window_1d(length, kernel, stride, dilation, causal, device)
    group = torch.arange(length, device=device) % dilation
    start = (first - group) // dilation          # in group coordinates, non-decreasing
    end = start + count                          # in each group, as is ``end``
    # The widest box a tile needs, in ints (torch.compile traces this: no tensor value
    # may decide a shape). Windows only move forward: a box spans from its first
    # query's window start to its last query's window end.
    width = 1
    for group_id in range(min(dilation, length)):
        size = -(-(length - group_id) // dilation)
        for lo_query in range(0, size, tile):
            hi_query = min(lo_query + tile, size) - 1
            lo = group_window(lo_query, size, kernel, stride, causal)[0]
            width = max(width, group_window(hi_query, size, kernel, stride, causal)[1] - lo)
    queries, keys, mask, rel = [], [], [], []
    for group_id in range(min(dilation, length)):
        members = torch.arange(group_id, length, dilation, device=device)  # group slot -> token
        size = members.numel()
        slot = torch.arange(-(-size // tile) * tile, device=device).clamp_max(size - 1)
        slot = slot.view(-1, tile)               # [tiles, T] group slots, last one repeated
        q_start, q_end = start[members][slot], end[members][slot]     # [tiles, T]
        lo = q_start[:, :1].clamp_max(max(size - width, 0))           # box inside the group
        key_slot = lo + torch.arange(width, device=device)            # [tiles, W]
        inside = key_slot < size
        key_slot = key_slot.clamp_max(size - 1)
        ks = key_slot[:, None, :]
        mask.append(inside[:, None, :] & (ks >= q_start[..., None]) & (ks < q_end[..., None]))
        rel.append((ks - pos[members][slot][..., None] + kernel - 1).clamp(0, 2 * kernel - 2))
        queries.append(members[slot])
        keys.append(members[key_slot])
    return TileTable(torch.cat(queries), torch.cat(keys), torch.cat(mask), torch.cat(rel))


def tile_tables(spatial, kernel_size, stride, dilation, is_causal, device=None,
                tiles=None) -> list[TileTable]:
    """Every dimension's tiling; ``tiles`` overrides the queries per tile (clamped)."""
    dims = list(zip(spatial, kernel_size, stride, dilation, is_causal))
    if tiles is None:
        tiles = [tile_size(k, len(dims), -(-n // d)) for n, k, _, d, _ in dims]
    return [tile_table_1d(n, k, s, d, c, min(t, n), device)
            for (n, k, s, d, c), t in zip(dims, tiles)]


def _spread(t: torch.Tensor, slots: list[int], ndim: int) -> torch.Tensor:
    """Places the axes of ``t`` at positions ``slots`` of a ``ndim``-axis broadcast shape."""
    shape = [1] * ndim
    for axis, slot in enumerate(slots):
        shape[slot] = t.shape[axis]
    return t.reshape(shape)


def _combine(tables: list[TileTable], field: str, prep, fn, init):
    """Outer combination over dimensions of a per-dimension ``[n, slots...]`` field into
    ``[n_0, ..., n_{d-1}, slots_0..., slots_1..., ...]`` (slot axes grouped by kind):
    ``fn(... fn(init, prep(0, field_0)) ..., prep(d - 1, field_{d-1}))`` broadcast."""
    nd = len(tables)
    slot_axes = getattr(tables[0], field).dim() - 1
    total = nd * (1 + slot_axes)
    out = init
    for i, table in enumerate(tables):
        slots = [i] + [nd * (1 + a) + i for a in range(slot_axes)]
        out = fn(out, _spread(prep(i, getattr(table, field)), slots, total))
    return out


def _heads_first(x: torch.Tensor, tokens: int, heads: int, dtype) -> torch.Tensor:
    """``[b, *spatial, heads, ...]`` as a contiguous ``[b, heads, tokens, rest]`` in ``dtype``."""
    return x.reshape(x.shape[0], tokens, heads, -1).transpose(1, 2).contiguous().to(dtype)


@dataclass(frozen=True)
class Layout:
    """The whole tiling, flattened over dimensions: ``queries[t, Tq]`` and ``keys[t, W]``
    token indices, ``masked[t, Tq, W]``, ``rel[t * Tq * W]`` (flat bias-table index) and
    ``home[N]`` (each token's first query slot, to return to token order)."""

    queries: torch.Tensor
    keys: torch.Tensor
    masked: torch.Tensor
    rel: torch.Tensor
    home: torch.Tensor


def _build_layout(spatial, kernel_size, stride, dilation, is_causal, tiles, device) -> Layout:
    tables = tile_tables(spatial, kernel_size, stride, dilation, is_causal, device, tiles)
    n_tiles = math.prod([t.queries.shape[0] for t in tables])
    long_zero = torch.zeros((), dtype=torch.long, device=device)

    def flat(field, sizes):  # the per-dimension indices of ``field`` as one row-major index
        steps = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
        return _combine(tables, field, lambda i, x: x * steps[i], torch.add,
                        long_zero).view(n_tiles, -1)

    queries = flat("queries", spatial)
    masked = ~_combine(tables, "mask", lambda i, m: m, torch.logical_and,
                       torch.ones((), dtype=torch.bool, device=device))
    slots = torch.arange(queries.numel(), device=device)
    home = torch.full((math.prod(spatial),), queries.numel(), dtype=torch.long,
                      device=device)
    home = home.scatter_reduce(0, queries.flatten(), slots, "amin")
    return Layout(queries, flat("keys", spatial), masked.view(n_tiles, queries.shape[1], -1),
                  flat("rel", [2 * k - 1 for k in kernel_size]).flatten(), home)


_cached_layout = functools.lru_cache(maxsize=64)(_build_layout)


def tile_layout(p: NAParams, device, tiles=None) -> Layout:
    """The tiling of ``p``'s token grid, cached per grid, window and device (the index
    tensors are read-only)."""
    # Under torch.compile with dynamic shapes the sizes are symbolic: ``operator.index``
    # specializes the tiling to their values (a guard each) instead of tracing it
    # symbolically, whose expressions grow until the compile takes minutes.
    key = (tuple(map(operator.index, p.spatial)), p.kernel_size, p.stride, p.dilation,
           p.is_causal, None if tiles is None else tuple(tiles), torch.device(device))
    if torch.compiler.is_compiling() or detect_fake_mode() is not None:
        return _build_layout(*key)  # traced into the graph, or fake tensors of the call
    # The layout outlives the call, so it is built as plain tensors whatever the caller's
    # mode: not inference tensors (autograd could not save them in a later training call),
    # not wrapped by torch.func transforms, and constants under torch.jit.trace (whether
    # cached or not, each traced run records the same graph).
    with torch.inference_mode(False), torch._C._DisableFuncTorch(), _untraced():
        return _cached_layout(*key)


def _grid_guard(spatial, query: torch.Tensor) -> torch.Tensor:
    """Zeros ``[1, *spatial, 1, 1]`` made outside ``torch.jit.trace``: a constant of the
    trace. Added to the query, it makes a traced graph (or a TorchScript-exported ONNX
    model) fail on another grid, whose tiling the trace's constant indices do not describe,
    instead of returning wrong values. (A grid of size 1 in a dimension broadcasts.)"""
    with _untraced():
        return torch.zeros((1, *map(int, spatial), 1, 1), dtype=query.dtype,
                           device=query.device)


@contextlib.contextmanager
def _untraced():
    """Pause ``torch.jit.trace`` (if it is recording) within the block."""
    state = torch._C._get_tracing_state()
    if state is not None:
        torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        if state is not None:
            torch._C._set_tracing_state(state)


def na_portable(query, key, value, p: NAParams, rpb=None, additional_keys=None,
                additional_values=None, dropout_p: float = 0.0, tiles=None,
                chunk_elements: Optional[int] = None):
    """Returns ``(out, lse)``; ``dropout_p`` drops attention probabilities (modules only).

    ``tiles`` overrides the per-dimension query tile and ``chunk_elements`` the score
    elements computed at once (tests).
    """
    kind = query.device.type  # (is_autocast_enabled raises for devices without autocast)
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        # The inputs are cast to the compute dtype below; autocast would run the products
        # in half precision again (float16 logits overflow where float32 ones do not).
        with torch.autocast(kind, enabled=False):
            return na_portable(query, key, value, p, rpb, additional_keys, additional_values,
                               dropout_p, tiles, chunk_elements)
    dtype = query.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    b, n, hk, dev = p.batch, p.num_tokens, p.kv_heads, query.device
    g = p.heads // hk
    lay = tile_layout(p, dev, tiles)
    if torch.jit.is_tracing():
        query = query + _grid_guard(p.spatial, query)
    under_transform = transformed((query, key, rpb, additional_keys))
    select = _selector(under_transform)
    (n_tiles, tq), tw = lay.queries.shape, lay.keys.shape[1]
    table = None if rpb is None else rpb.to(compute).reshape(hk, g, -1)

    # [b, kv_head, token, rest]; the query's rest is its ``g`` heads' vectors. Cast
    # before gathering: the gathers' backward then sums in ``compute`` precision.
    q = _heads_first(query, n, hk, compute) * p.scale
    k = _heads_first(key, n, hk, compute)
    v = _heads_first(value, n, hk, compute)
    extra = None
    if additional_keys is not None:
        extra = (additional_keys.to(compute).permute(0, 2, 3, 1),             # b hk d E
                 additional_values.to(compute).transpose(1, 2))                # b hk E dv
    # Tiles in chunks, so that no score tensor grows past ``chunk_elements``: per sample
    # under torch.compile, where the batch is a symbolic size: a chunk count computed from
    # it would guard on its value and recompile for each new batch (and fail at dynamo's
    # recompile limit under fullgraph=True); likewise under torch.jit.trace, which records
    # the chunk count as a constant but the chunk sizes from the traced batch size.
    if chunk_elements is None:
        chunk_elements = default_chunk(dev)
    per_sample = torch.compiler.is_compiling() or torch.jit.is_tracing()
    rows = p.heads * tq * tw * (1 if per_sample else b)
    step = max(1, chunk_elements // rows)
    # vmap cannot add a batched bias (an rpb vmapped over) into unbatched scores in place
    in_place = not under_transform
    starts = range(0, n_tiles, step)
    tiles_of = [min(lo + step, n_tiles) - lo for lo in starts]
    qs = _row_chunks(q, lay.queries.flatten(), [t * tq for t in tiles_of], select)
    ks, vs = (_row_chunks(x, lay.keys.flatten(), [t * tw for t in tiles_of], select)
              for x in (k, v))
    outs, lses = [], []
    for lo, count, qc, kc, vc in zip(starts, tiles_of, qs, ks, vs):
        o, s = _attend(qc, kc, vc, _bias(lay, lo, lo + count, table, compute, select), extra,
                       count, g, dropout_p, in_place)
        outs.append(o)
        lses.append(s)
    out, lse = (torch.cat(x, 2) if len(x) > 1 else x[0] for x in (outs, lses))
    # back to token order
    out = select(out, 2, lay.home).transpose(1, 2).reshape(*query.shape[:-1], -1)
    lse = select(lse, 2, lay.home).transpose(1, 2).reshape(query.shape[:-1])
    return out.to(dtype), lse if lse.dtype == torch.float64 else lse.float()


def _row_chunks(x: torch.Tensor, index: torch.Tensor, sizes: list[int], select):
    """The rows ``index`` of ``x`` (dim 2), in consecutive chunks of ``sizes`` rows.

    Gathered chunk by chunk (the memory of one chunk at a time) when no gradient flows to
    ``x``; else at once and split: each chunk's own gather would get, in the backward, a
    zero gradient of all of ``x`` to add its rows into (quadratic in the chunk count),
    while one gather's backward adds every row into one (and autograd keeps every chunk's
    rows for the backward anyway). ``torch.jit.trace`` records the first form whatever
    the grad mode (its check re-traces in another mode and compares the graphs)."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
        return torch.split(select(x, 2, index), sizes, dim=2)
    return (select(x, 2, part) for part in torch.split(index, sizes))


def _bias(lay: Layout, lo: int, hi: int, table, dtype, select) -> torch.Tensor:
    """The additive bias of tiles ``lo:hi``, broadcastable to ``[hk, tiles, Tq, g, W]``:
    the window mask (0 or -inf) plus, with ``table`` (the RPB as ``[hk, g, entries]``), the
    bias of each pair. Built per chunk: a bias of every tile at once held ``N * W^d``
    values per head, and each chunk's slice of it cost a full-size zero gradient in the
    backward (quadratic in the chunk count)."""
    masked = lay.masked[lo:hi]
    n, tq, tw = masked.shape
    bias = torch.zeros(masked.shape, dtype=dtype, device=masked.device)
    bias = bias.masked_fill_(masked, -math.inf).view(1, n, tq, 1, tw)
    if table is None:
        return bias
    hk, g = table.shape[:2]
    pairs = select(table, 2, lay.rel[lo * tq * tw:hi * tq * tw])
    return bias + pairs.view(hk, g, n, tq, tw).permute(0, 2, 3, 1, 4)


def _selector(under_transform: bool):
    """``torch.index_select``, except under ``torch.compile`` inside a ``torch.func``
    transform (``under_transform``): there inductor (torch 2.13, CPU) miscompiles the vmapped backward of
    ``index_select`` (an ``index_add`` of a permuted source: wrong values, sometimes heap
    corruption; compiled ``jacrev`` returned garbage), and plain indexing, whose backward
    lowers differently, is used instead."""
    if torch.compiler.is_compiling() and under_transform:
        return lambda x, dim, index: x[(slice(None),) * dim + (index,)]
    return torch.index_select


def _attend(q, k, v, bias, extra, n_tiles: int, g: int, dropout_p: float, in_place: bool):
    """Attention of ``n_tiles`` query tiles to their key boxes (and the extra tokens).

    ``q: [b, hk, tiles * Tq, g * d]``, ``k, v: [b, hk, tiles * W, d]``, ``bias``
    broadcasts to ``[hk, tiles, Tq, g, W]``; returns ``out: [b, hk, tiles * Tq, g, dv]``
    and ``lse: [b, hk, tiles * Tq, g]``.
    """
    b, hk = q.shape[:2]
    tw = bias.shape[-1]
    q = q.view(b, hk, n_tiles, -1, q.shape[-1] // g)                   # b hk t Tq*g d
    k = k.view(b, hk, n_tiles, tw, -1)
    v = v.view(b, hk, n_tiles, tw, -1)
    # In-place steps on the product itself (never on a view of it: autograd would copy).
    bias = bias.expand(bias.shape[0], n_tiles, bias.shape[2], g, tw).reshape(
        bias.shape[0], n_tiles, -1, tw)
    logits = q @ k.transpose(-1, -2)                                     # b hk t Tq*g W
    logits = logits.add_(bias) if in_place else logits + bias
    extra_logits = None
    if extra is not None:  # every query attends all E extra tokens
        extra_logits = (q.flatten(2, 3) @ extra[0]).view(*logits.shape[:-1], -1)
    # Softmax by hand, so that the log-sum-exp comes from the same passes. The shift is
    # a constant (detached): neither result depends on it.
    shift = logits.detach().amax(-1, keepdim=True)
    if extra is not None:
        shift = torch.maximum(shift, extra_logits.detach().amax(-1, keepdim=True))
    logits = (logits.sub_(shift) if in_place else logits - shift).exp_()
    total = logits.sum(-1, keepdim=True)
    if extra is not None:
        extra_logits = (extra_logits - shift).exp_()
        total = total + extra_logits.sum(-1, keepdim=True)
    lse = shift + total.log()
    inverse = total.reciprocal()  # products backpropagate in fewer passes than quotients
    probs = logits * inverse
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = probs @ v                                                      # b hk t Tq*g dv
    if extra is not None:
        probs = extra_logits * inverse
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        out = out + (probs.flatten(2, 3) @ extra[1]).view(out.shape)
    return out.view(b, hk, -1, g, out.shape[-1]), lse.view(b, hk, -1, g)
