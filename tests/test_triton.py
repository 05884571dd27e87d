"""The Triton backend vs the reference: every feature, forward and every gradient.

On CPU the kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``), so
the CPU cases are tiny, one per feature. With CUDA the same file also runs a random sweep
(``NATKIT_TRITON_SWEEP`` configs, default 320) in float32 vs float64, half precision with
the FlashAttention tolerance rule, and poisoned (NaN-filled) output buffers throughout.
"""

from __future__ import annotations


import pytest
import torch

import natkit
from natkit._checks import check_inputs
from natkit._determinism import restored
from natkit.backends.reference import na_reference
from sweep import Config, assert_fa_close, grads, make_inputs, params

import natkit.backends.triton as triton_backend
from natkit.backends.triton import TileConfig, configs, op

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch):
    monkeypatch.setenv("NATKIT_TRITON_ON_CPU", "1")  # CPU tensors allowed under the interpreter
    monkeypatch.setenv("NATKIT_TRITON_AUTOTUNE", "0")  # the sweep must not tune every shape
    monkeypatch.setattr(op, "POISON", True)  # NaN-filled outputs catch unwritten elements


def cfg(spatial, kernel, dilation=1, stride=1, causal=False, batch=1, heads=2, kv_heads=2,
        head_dim=16, rpb=False, num_extra=0) -> Config:
    nd = len(spatial)
    tup = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * nd  # noqa: E731
    return Config(tuple(spatial), tup(kernel), tup(dilation), tup(stride), tup(causal), batch,
                  heads, kv_heads, head_dim, rpb, num_extra)


def run(c: Config, inputs: dict, backend: str):
    return natkit.neighborhood_attention(
        inputs["query"], inputs["key"], inputs["value"], **c.kwargs(), rpb=inputs["rpb"],
        additional_keys=inputs["additional_keys"], additional_values=inputs["additional_values"],
        return_lse=True, backend=backend)


def check(c: Config, dtype=torch.float32, qkv_view=False, seed=0):
    """Forward, lse and all gradients (through out and lse) vs float64 (FA rule for every dtype)."""
    torch.manual_seed(seed)
    ref_in = make_inputs(c, torch.float64, DEVICE)
    if qkv_view:  # q, k, v as strided views of one fused projection output (no copies)
        b, h, d = c.batch, c.heads, c.head_dim
        assert c.kv_heads == h
        qkv = torch.randn(b, *c.spatial, 3, h, d + 3, dtype=torch.float64, device=DEVICE)
        for i, name in enumerate(("query", "key", "value")):
            ref_in[name] = qkv[..., i, :, 1:d + 1].requires_grad_()
    got_in = {n: None if t is None else t.detach().to(dtype).requires_grad_()
              for n, t in ref_in.items()}
    if qkv_view:
        qkv_d = qkv.to(dtype)
        for i, name in enumerate(("query", "key", "value")):
            got_in[name] = qkv_d[..., i, :, 1:c.head_dim + 1].requires_grad_()
        assert not got_in["query"].is_contiguous()
    # FlashAttention's rule compares with the reference on the same (rounded) inputs
    ref_in, low_in = ({n: None if t is None else t.detach().to(to).requires_grad_()
                       for n, t in got_in.items()} for to in (torch.float64, dtype))
    out, lse = run(c, got_in, "triton")
    ref, ref_lse = run(c, ref_in, "reference")
    p = params(c, low_in)
    low, low_lse = na_reference(low_in["query"], low_in["key"], low_in["value"], p,
                                low_in["rpb"], low_in["additional_keys"],
                                low_in["additional_values"], upcast=False)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == out.shape[:-1]
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_fa_close("out", out, ref, low, dtype)
    assert_fa_close("lse", lse, ref_lse, low_lse.float(), torch.float32)
    g_out = torch.randn_like(ref)
    g_lse = torch.randn_like(ref_lse)
    got_g = grads(out, lse, got_in, g_out, g_lse)
    ref_g = grads(ref, ref_lse, ref_in, g_out, g_lse)
    low_g = grads(low, low_lse, low_in, g_out, g_lse)
    for name in ref_g:
        assert torch.isfinite(got_g[name]).all(), name
        assert_fa_close(f"d{name}", got_g[name], ref_g[name], low_g[name], dtype)


FEATURES = {
    "1d_odd": cfg((21,), 5),
    "1d_even_dilation_stride": cfg((22,), 4, dilation=2, stride=2),
    "2d_causal_mixed_even": cfg((9, 10), (3, 4), causal=(True, False), stride=(1, 2)),
    "2d_rpb_dilation": cfg((11, 10), 3, dilation=(2, 3), rpb=True, batch=2),
    "3d_gqa_extra_dilation_stride": cfg((5, 6, 7), (3, 2, 3), dilation=(1, 2, 1),
                                        stride=(2, 1, 3), heads=4, kv_heads=2, num_extra=3,
                                        head_dim=24),
    "3d_causal_rpb_free_mqa": cfg((4, 5, 6), (2, 3, 4), causal=True, heads=2, kv_heads=1,
                                  head_dim=12),
    "3d_rpb": cfg((5, 4, 6), 3, rpb=True, head_dim=8),
    "2d_extra_rpb_mqa": cfg((7, 9), (5, 3), rpb=True, heads=3, kv_heads=1, num_extra=2),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_feature_float32(name):
    check(FEATURES[name])


@pytest.mark.parametrize("name", ["2d_causal_mixed_even", "3d_gqa_extra_dilation_stride"])
def test_flop_counter_counts_the_attended_pairs(name):
    from sweep import counted_flops
    forward, backward, want_forward, want_backward = counted_flops(FEATURES[name], "triton",
                                                                   DEVICE)
    assert (forward, backward) == (want_forward, want_backward)


def test_noncontiguous_qkv_and_odd_head_dim():
    check(cfg((9, 8), 3, rpb=True, head_dim=20), qkv_view=True)


def test_half_precision():
    check(cfg((8, 9), 3, rpb=True, num_extra=2, head_dim=16), dtype=torch.float16)
    q = torch.randn(1, 8, 9, 2, 16, dtype=torch.bfloat16, device=DEVICE)
    if CUDA:
        check(cfg((8, 9), 3, rpb=True, num_extra=2, head_dim=16), dtype=torch.bfloat16)
    else:  # the interpreter's bfloat16 dot is wrong: the backend says so instead of running
        with pytest.raises(ValueError, match="interpreter computes bfloat16 dots incorrectly"):
            natkit.na2d(q, q, q, 3, backend="triton")


def test_unmasked_interior_tiles():
    """Small tiles on a large kernel: interior key tiles take the unmasked path in all kernels."""
    tile = TileConfig((1, 4, 4), (1, 4, 4), 4, 1)
    with configs.override(fwd=tile, dq=tile, dkdv=tile):
        check(cfg((12, 12), 9, rpb=True, heads=1, kv_heads=1))
    tile = TileConfig((1, 1, 16), (1, 1, 16), 4, 1)
    with configs.override(fwd=tile, dq=tile, dkdv=tile):
        check(cfg((60,), 33, stride=2, heads=1, kv_heads=1))


@pytest.mark.parametrize("rpb", [False, True])
@pytest.mark.parametrize("head_dim", [16, 96])
def test_every_2d_candidate(head_dim, rpb):
    """Every config the autotuner may pick for 2-D head dims <= 32 (the NAT case) and
    65-128 (large kernels; 96 also pads the head dim) is exact, not only the defaults the
    other tests run. 12x20 tokens leave the largest tiles (8x16 / 8x16) unclamped."""
    c = cfg((12, 20), 5, rpb=rpb, heads=2, kv_heads=1, head_dim=head_dim)
    group_lengths = (1, 12, 20)
    kinds = configs.KINDS if rpb else ("fwd", "dq", "dkdv")
    per_kind = {kind: configs.candidates(2, configs.block_d(c.head_dim), group_lengths, kind, rpb,
                                         dtype=torch.float32)  # what check() runs
                for kind in kinds}
    for i in range(max(len(v) for v in per_kind.values())):
        chosen = {kind: cands[min(i, len(cands) - 1)] for kind, cands in per_kind.items()}
        with configs.override(**chosen):  # with rpb: a dRPB tile forces the separate scheme
            check(c, seed=i)
        if rpb:  # and the dQ kernel's own atomics
            with configs.override(**dict(chosen, drpb="fused")):
                check(c, seed=i)


@pytest.mark.parametrize("name,sms,partial", [("2d_rpb_dilation", 2, False), ("3d_rpb", 0, True),
                                              ("2d_extra_rpb_mqa", 2, True),
                                              ("1d_rpb_stride", 2, False),
                                              ("2d_rpb_stride_gqa", 0, False)])
def test_separate_drpb_scheme(name, sms, partial, monkeypatch, deterministic):
    """The dRPB kernel (``configs.drpb_scheme`` "separate") on every rpb feature. ``sms``
    sizes the launch: with 2, several programs share a shift's work items (each adds its
    own sum); with 0, one program per shift. ``partial``: in deterministic mode, where the
    programs store their sums for ``op.fold_partials`` instead of adding them."""
    c = dict(FEATURES, **{
        "1d_rpb_stride": cfg((22,), 5, dilation=2, stride=2, rpb=True, batch=3),
        "2d_rpb_stride_gqa": cfg((9, 10), (3, 5), stride=(1, 2), rpb=True, heads=4, kv_heads=2),
    })[name]
    monkeypatch.setattr(op, "_sms", lambda device: sms)
    g = op.geometry(torch.empty(c.batch, *c.spatial, c.heads, c.head_dim), c.kernel_size,
                    c.dilation, c.stride, c.is_causal)
    tile = configs.candidates(g.ndim, configs.block_d(c.head_dim), g.group_lengths, "drpb",
                              True, dtype=torch.float32)[0]
    assert (op.drpb_layout(g, tile, c.batch, c.heads, sms).splits > 1) == (sms > 0)
    deterministic(partial)
    with configs.override(drpb="separate"):
        check(c)
    assert configs.last_drpb_scheme() == "separate"


def test_can_run_reasons(monkeypatch):
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    p = check_inputs(1, q, q, q, 3, 1, 1, False, None, None, None, None)
    assert "float64" in triton_backend.can_run(p, q, None, False)
    qf = q.float()
    pf = check_inputs(1, qf, qf, qf, 3, 1, 1, False, None, None, None, None)
    monkeypatch.delenv("NATKIT_TRITON_ON_CPU")
    assert "CUDA" in triton_backend.can_run(pf, qf, None, False)
    with pytest.raises(ValueError, match="float64 is not supported"):
        natkit.na1d(q, q, q, 3, backend="triton")
    big = torch.randn(1, 8, 1, 300)
    pb = check_inputs(1, big, big, big, 3, 1, 1, False, None, None, None, None)
    assert "head_dim 300" in triton_backend.can_run(pb, big, None, False)


@pytest.fixture
def deterministic(monkeypatch):
    """``torch.use_deterministic_algorithms`` for one test: yields its setter."""
    # cuBLAS (the reference's matmuls) refuses deterministic mode without this
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with restored():
        yield torch.use_deterministic_algorithms


def test_deterministic_mode(deterministic, monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the triton backend still runs:
    the rpb gradient comes from the dRPB kernel's partial tiles, summed in a fixed order
    (no atomics, the kernels' only run-order dependence), configs are the defaults (no
    autotuning, no tuned cache entry), and gradients repeat bit for bit."""
    from natkit.backends import choose_backend
    folds = []
    fold = op.fold_partials
    monkeypatch.setattr(op, "fold_partials", lambda *a: folds.append(1) or fold(*a))
    monkeypatch.setattr(op, "_sms", lambda device: 2)   # several splits per shift to sum
    c = cfg((9, 11), 3, dilation=(2, 1), rpb=True, batch=2, heads=2, kv_heads=1)
    q = torch.randn(1, 9, 2, 16, device=DEVICE, requires_grad=True)
    rpb = torch.randn(2, 5, device=DEVICE, requires_grad=True)
    p = check_inputs(1, q, q, q, 3, 1, 1, False, rpb, None, None, None)
    deterministic(True)
    assert triton_backend.can_run(p, q, rpb, True) is None
    assert choose_backend(None, p, q, rpb, True).name == "triton"
    assert not configs.autotune_enabled("cuda")
    check(c)
    assert configs.last_drpb_scheme() == "separate" and len(folds) == 1
    # a tuned cache entry is neither used nor replaced
    tuned = TileConfig((1, 2, 16), (1, 2, 16), 1, 1)
    monkeypatch.setattr(configs, "_CACHE", {})
    key = ("k",)
    configs._CACHE[("fwd",) + key] = tuned
    cands = configs.candidates(2, 16, (1, 9, 11), "fwd", False, dtype=torch.float32)
    assert configs.choose("fwd", key, 2, 16, (1, 9, 11), "cuda", None, False,
                          torch.float32) == cands[0] != tuned
    assert configs._CACHE == {("fwd",) + key: tuned}
    # bitwise repeatable gradients
    torch.manual_seed(0)
    inputs = make_inputs(c, torch.float32, DEVICE)
    runs = []
    for _ in range(2):
        out, lse = run(c, inputs, "triton")
        runs.append(torch.autograd.grad((out.sum() + lse.sum()), [inputs["rpb"], inputs["query"]]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    # the atomics, forced: an error, or with warn_only a warning (PyTorch's convention)
    with configs.override(drpb="fused"):
        out, lse = run(c, inputs, "triton")
        with pytest.raises(RuntimeError, match="drpb='fused'.*use_deterministic_algorithms"):
            out.sum().backward()
        deterministic(True, warn_only=True)
        out, lse = run(c, inputs, "triton")
        with pytest.warns(UserWarning, match=r"drpb='fused'\) sums the rpb gradient with atomics"):
            out.sum().backward()
    assert configs.last_drpb_scheme() == "fused"


@pytest.mark.parametrize("drpb,strides", [("fused", (0, 2**30, 16, 1)),
                                          ("separate", (0, 2**30, 16, 1)),
                                          ("fused", (0, 1, 4, 2**28))])
def test_offsets_past_2_31_elements_per_batch_element(drpb, strides):
    """A query whose batch element spans more than 2^31 elements (spatial stride 2^30, or
    head-dim stride 2^28, as a view into a 10 GB storage of which only the view's elements
    are touched; under the interpreter the storage stays virtual): the kernels compute
    offsets in int64, forward and every gradient, rpb (both schemes) and extra tokens
    included (in int32, queries 2 and 3, or head dims 8-15, read and wrote wrapped
    addresses)."""
    c = cfg((4,), 3, heads=1, kv_heads=1, rpb=True, num_extra=2)
    pre = 2**31 + 64
    span = sum((n - 1) * st for n, st in zip((1, 4, 1, 16), strides))
    base = torch.empty(pre + span + 1, dtype=torch.float16, device=DEVICE)
    inputs = make_inputs(c, torch.float16, DEVICE)
    q = base.as_strided((1, 4, 1, 16), strides, storage_offset=pre)
    with torch.no_grad():
        q.copy_(inputs["query"])
    inputs["query"] = q.requires_grad_()
    assert op._big(q) and not op._big(inputs["key"])
    with configs.override(drpb=drpb):
        out, lse = run(c, inputs, "triton")
        ref_in = {n: None if t is None else t.detach().double().requires_grad_()
                  for n, t in inputs.items()}
        ref, ref_lse = run(c, ref_in, "reference")
        torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-3, rtol=0)
        names = [n for n, t in inputs.items() if t is not None]
        dout = torch.randn_like(ref)
        got = torch.autograd.grad(out, [inputs[n] for n in names], dout.half())
        want = torch.autograd.grad(ref, [ref_in[n] for n in names], dout)
    assert configs.last_drpb_scheme() == drpb
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double(), b, atol=5e-3, rtol=0, msg=name)


def test_one_grid_axis_for_any_batch_and_heads():
    """CUDA caps a grid's second and third axes at 65535 programs: batch * heads goes on the
    first axis with the tile slots (``window.program_ids``), at any batch size."""
    q = torch.empty(70000, 4, 2, 16, device="meta")
    g = op.geometry(q, (3,), (1,), (1,), (False,))
    tile = TileConfig((1, 1, 16), (1, 1, 16))
    grid, args, _ = op.fwd_args(q, q, q, q, q[..., 0], None, None, None, g, tile, 0.25)
    assert grid == (70000 * 2,)  # one slot of 16 queries, 2 heads
    grid, _, _ = op.dkdv_args(q, q, q, q, q[..., 0], q[..., 0], q, q, None, g, tile, 0.25)
    assert grid == (70000 * 2,)
    assert not args[-1]  # int32 offsets: no batch element spans 2^31 elements


def test_config_override_validation():
    with pytest.raises(ValueError, match="kind must be one of"):
        configs.set_override("bwd", TileConfig((1, 1, 16), (1, 1, 16)))
    with pytest.raises(TypeError, match="TileConfig"):
        configs.set_override("fwd", (1, 1, 16))
    with pytest.raises(TypeError, match="'fused', 'separate'"):
        configs.set_override("drpb", 3)
    with pytest.raises(ValueError, match="drpb scheme must be one of .* got 'atomic'"):
        configs.set_override("drpb", "atomic")
    with pytest.raises(TypeError, match="for 'dq' must be a TileConfig or None"):
        configs.set_override("dq", "fused")
    assert configs.fit((4, 4, 8), (1, 3, 2)) == (1, 4, 4)  # clamped, then grown to 16 tokens
    with pytest.raises(ValueError, match=r"q_tile must be 3 powers of two, got \(1, 3, 8\)"):
        configs.set_override("fwd", TileConfig((1, 3, 8), (1, 1, 16)))
    with pytest.raises(ValueError, match=r"k_tile must be 3 powers of two, got \(1, 16\)"):
        configs.set_override("dq", TileConfig((1, 1, 16), (1, 16)))
    with pytest.raises(ValueError, match="num_warps must be one of .* got 3"):
        configs.set_override("dkdv", TileConfig((1, 1, 16), (1, 1, 16), num_warps=3))
    with pytest.raises(ValueError, match="num_stages must be an int >= 1, got 0"):
        configs.set_override("drpb", TileConfig((1, 1, 16), (1, 1, 16), num_stages=0))
    assert configs._OVERRIDE == {}


def test_drpb_scheme_choice(monkeypatch):
    """Forced by an override, else cached per key, else timed where autotuning runs (CUDA):
    the faster scheme wins and a failing timing keeps the atomics; else the atomics."""
    calls = []

    def timer(name, ms):
        def time_it():
            calls.append(name)
            return ms
        return time_it

    def failing():
        raise RuntimeError("out of resources")

    monkeypatch.setattr(configs, "_SCHEMES", {})
    monkeypatch.setenv("NATKIT_TRITON_AUTOTUNE", "1")
    choose = configs.drpb_scheme
    assert choose(("a",), "cpu", timer("f", 1.0), timer("s", 0.5)) == "fused" and calls == []
    assert choose(("b",), "cuda", timer("f", 1.0), timer("s", 0.5)) == "separate"
    assert calls == ["f", "s"]
    assert choose(("b",), "cuda", timer("f", 0.1), timer("s", 0.5)) == "separate"  # cached
    assert calls == ["f", "s"] and configs.last_drpb_scheme() == "separate"
    assert choose(("c",), "cuda", timer("f", 0.4), timer("s", 0.5)) == "fused"
    assert choose(("d",), "cuda", timer("f", 1.0), failing) == "fused"
    monkeypatch.setenv("NATKIT_TRITON_AUTOTUNE", "0")
    assert choose(("e",), "cuda", timer("f", 1.0), timer("s", 0.5)) == "fused"
    for forced, want in (("separate", "separate"), ("fused", "fused"),
                         (TileConfig((1, 1, 16), (1, 1, 16)), "separate")):
        with configs.override(drpb=forced):
            assert choose(("b",) if want == "fused" else ("c",), "cuda", failing,
                          failing) == want
            assert configs.last_drpb_scheme() == want


def test_autotuning_runs_every_kernel_and_both_drpb_schemes(monkeypatch):
    """The tuning path as on CUDA, here timed by the wall clock in the interpreter: every
    kernel's candidates and both rpb-gradient schemes run, and the tuned call is exact."""
    import time

    def wall_clock(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    monkeypatch.setattr(op, "_bench", wall_clock)
    monkeypatch.setattr(configs, "autotune_enabled", lambda device_type: True)
    monkeypatch.setattr(configs, "_CACHE", {})
    monkeypatch.setattr(configs, "_SCHEMES", {})
    check(cfg((8, 9), 3, rpb=True, heads=1, kv_heads=1))
    assert {key[0] for key in configs._CACHE} == {"fwd", "dq", "dkdv", "drpb"}
    assert {key[-1] for key in configs._CACHE if key[0] == "dq"} == {True, False}  # atomics or not
    assert list(configs._SCHEMES.values()) == [configs.last_drpb_scheme()]
    # tuned per device and per product precision (GPUs differ in shared memory)
    assert all("ieee" in key and any(str(k).startswith(DEVICE) for k in key)
               for key in configs._CACHE)


def test_strided_rpb():
    """A non-contiguous bias table (here a transposed view) reads the same values as its copy."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 9, 10, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    base = torch.randn(2, 9, 9, device=DEVICE)
    grads = []
    for backend in ("reference", "triton"):
        rpb = base.clone().requires_grad_()
        out = natkit.na2d(q, k, v, 5, rpb=rpb.transpose(1, 2), backend=backend)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, rpb))))
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_frozen_rpb_skips_its_gradient(monkeypatch):
    """A bias that needs no gradient costs the backward nothing extra: no rpb-gradient scheme
    is chosen (no atomics, no dRPB kernel), and the other gradients are exact, also compiled."""
    def no_scheme(*args):
        raise AssertionError("the rpb gradient was computed for a frozen bias")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 9, 10, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 9, 9, device=DEVICE)
    want = torch.autograd.grad(natkit.na2d(q, k, v, 5, rpb=rpb, backend="reference").square()
                               .sum(), (q, k, v))
    monkeypatch.setattr(configs, "drpb_scheme", no_scheme)

    def fn(q, k, v, rpb):
        return natkit.na2d(q, k, v, 5, rpb=rpb, backend="triton")
    torch._dynamo.reset()
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        got = torch.autograd.grad(f(q, k, v, rpb).square().sum(), (q, k, v))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    backend = "inductor" if CUDA else "aot_eager"
    q, k, v = (torch.randn(1, 9, 10, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, device=DEVICE, requires_grad=True)

    def fn(q, k, v, rpb):
        return natkit.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    out = compiled(q, k, v, rpb)
    torch.testing.assert_close(out, fn(q, k, v, rpb), atol=1e-5, rtol=0)
    out.sum().backward()
    assert q.grad is not None and rpb.grad is not None


# ----------------------------------------------------------------------------------------
# GPU only: random sweep (the interpreter is far too slow for it)
