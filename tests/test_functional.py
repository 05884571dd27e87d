"""The public op: portable backend vs the reference, gradcheck, merge, special cases, compile."""

import dataclasses
import math
import random
import threading
import time

import pytest
import torch

import natkit
from natkit._checks import check_inputs
from natkit.backends.reference import na_reference
from natkit.bench.baselines import full_attention, relative_bias_table, window_attention
from sweep import (SWEEP, assert_fa_close, grads, make_inputs, params, random_config,
                   reference_pairs)


def run(cfg, inputs, backend, **extra):
    return natkit.neighborhood_attention(
        inputs["query"], inputs["key"], inputs["value"], **cfg.kwargs(), rpb=inputs["rpb"],
        additional_keys=inputs["additional_keys"], additional_values=inputs["additional_values"],
        return_lse=True, backend=backend, **extra)


def compare(cfg, backend, dtype, atol):
    inputs = make_inputs(cfg, dtype)
    out, lse = run(cfg, inputs, backend)
    ref, ref_lse = run(cfg, inputs, "reference")
    assert out.shape == inputs["query"].shape and out.dtype == dtype
    assert lse.shape == inputs["query"].shape[:-1]
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=0)
    g_out = torch.randn(out.shape, dtype=torch.float64)
    g_lse = torch.randn(lse.shape, dtype=torch.float64)
    got = grads(out, lse, inputs, g_out, g_lse)
    want = grads(ref, ref_lse, inputs, g_out, g_lse)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("seed", range(SWEEP))
def test_portable_matches_reference_float64(seed):
    cfg = random_config(random.Random(seed))
    compare(cfg, "torch", torch.float64, atol=1e-10)


@pytest.mark.parametrize("seed", range(40))
def test_portable_any_tiling_matches_reference(seed):
    """The portable backend with random query tiles (1 query up to more than the length,
    per dimension) and chunks (one tile at a time, or all): tile borders, padded query
    slots and padded key slots in every feature combination, forward and every gradient,
    float64."""
    from natkit.backends.portable import na_portable
    rng = random.Random(3000 + seed)
    cfg = random_config(rng)
    tiles = [rng.randint(1, n + 2) for n in cfg.spatial]
    d = make_inputs(cfg)
    p = params(cfg, d)
    args = (d["query"], d["key"], d["value"], p, d["rpb"], d["additional_keys"],
            d["additional_values"])
    out, lse = na_portable(*args, tiles=tiles, chunk_elements=rng.choice((1, 1 << 22)))
    ref, ref_lse = run(cfg, d, "reference")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=0)
    g_out, g_lse = torch.randn(out.shape, dtype=torch.float64), torch.randn(lse.shape).double()
    got, want = grads(out, lse, d, g_out, g_lse), grads(ref, ref_lse, d, g_out, g_lse)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(6))
def test_portable_half_precision(seed, dtype):
    """FlashAttention's rule: error vs the float64 result at most twice the error of the
    reference computed in ``dtype``, plus a small floor."""
    cfg = random_config(random.Random(1000 + seed))
    inputs = make_inputs(cfg, dtype)
    exact = make_inputs(cfg, torch.float64)
    for name in inputs:
        if inputs[name] is not None:
            exact[name] = inputs[name].detach().double().requires_grad_()
    from natkit.backends.reference import na_reference
    p = params(cfg, inputs)
    args = lambda d: (d["query"], d["key"], d["value"], p, d["rpb"], d["additional_keys"],
                      d["additional_values"])
    out, lse = run(cfg, inputs, "torch")
    low, low_lse = na_reference(*args(inputs), upcast=False)
    ref, ref_lse = na_reference(*args(exact))
    g = torch.randn(out.shape, dtype=torch.float64)
    got, lowg, refg = (grads(o, l, d, g) for o, l, d in
                       ((out, lse, inputs), (low, low_lse, inputs), (ref, ref_lse, exact)))
    assert_fa_close("out", out, ref, low, dtype)
    assert_fa_close("lse", lse, ref_lse, low_lse, dtype)
    for name in refg:
        assert_fa_close(name, got[name], refg[name], lowg[name], dtype)


def _grad_error(backend, dtype, inputs, wrt, **kwargs):
    """Max |grad - float64 reference grad| of ``sum(out * g)`` w.r.t. input ``wrt``."""
    q, k, v, g = inputs

    def grad(backend, dtype):
        t = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = natkit.na1d(*t, backend=backend, **kwargs)
        return torch.autograd.grad((out.double() * g).sum(), t[wrt])[0].double()
    return (grad(backend, dtype) - grad("reference", torch.float64)).abs().max().item()


def test_portable_half_sums_key_value_grads_in_float32():
    """31 queries add into each dV row: summed in float16 (cast after the gather) the error
    was 2.4e-3; in float32 it stays within twice the float16 rounding of dV itself."""
    torch.manual_seed(0)
    inputs = [torch.randn(1, 64, 1, 16, dtype=torch.float64) for _ in range(4)]
    err = _grad_error("torch", torch.float16, inputs, wrt=2, kernel_size=31)
    q, k, v, g = (x.to(torch.float64).requires_grad_() for x in inputs)
    exact = torch.autograd.grad((natkit.na1d(q, k, v, 31, backend="reference") * g).sum(), v)[0]
    assert err <= 2 * (exact.half().double() - exact).abs().max().item()


def test_portable_gradients_stay_exact_at_large_lse():
    """Logits in the hundreds: probabilities from exp(logits - lse) lost the
    softmax backward's cancellation (here dq error 8.3e-4 vs 1.3e-5 for the reference
    in fp32; now 4.3e-6)."""
    torch.manual_seed(0)
    inputs = [torch.randn(1, 12, 1, 32, dtype=torch.float64) * s for s in (4, 4, 1, 1)]
    kwargs = dict(kernel_size=11, is_causal=True, scale=2.0)
    err = _grad_error("torch", torch.float32, inputs, wrt=0, **kwargs)
    assert err <= 2 * _grad_error("reference", torch.float32, inputs, wrt=0, **kwargs) + 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_gradcheck_float64(seed):
    rng = random.Random(2000 + seed)
    cfg = random_config(rng, max_tokens=30)
    inputs = make_inputs(cfg, torch.float64)
    names = [n for n, v in inputs.items() if v is not None]

    def fn(*tensors):
        d = dict(inputs, **dict(zip(names, tensors)))
        out, lse = run(cfg, d, "torch")
        return out, lse

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names], atol=1e-8)


def test_all_features_at_once_gradcheck():
    """RPB + extra KV + GQA + dilation + stride in one tiny 2-D case."""
    from sweep import Config
    cfg = Config((6, 5), (3, 3), (2, 1), (1, 2), (False, False), 1, 4, 2, 3, True, 2)
    inputs = make_inputs(cfg)
    names = [n for n, v in inputs.items() if v is not None]
    fn = lambda *t: run(cfg, dict(inputs, **dict(zip(names, t))), "torch")
    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names], atol=1e-8)


def test_portable_double_backward_gradgradcheck():
    """The README promises double backward (``create_graph=True``) on the torch backend:
    RPB + extra KV + GQA + dilation + stride + causal, second derivatives by gradgradcheck."""
    from sweep import Config
    cfg = Config((5, 4), (3, 2), (1, 2), (2, 1), (False, True), 1, 2, 1, 3, False, 2)
    inputs = make_inputs(cfg)
    inputs["rpb"] = None
    names = [n for n, v in inputs.items() if v is not None]
    fn = lambda *t: run(cfg, dict(inputs, **dict(zip(names, t))), "torch")
    assert torch.autograd.gradgradcheck(fn, [inputs[n] for n in names], atol=1e-7)
    cfg = Config((6,), (3,), (1,), (1,), (False,), 1, 2, 2, 2, True, 0)
    inputs = make_inputs(cfg)
    names = [n for n, v in inputs.items() if v is not None]
    fn = lambda *t: run(cfg, dict(inputs, **dict(zip(names, t))), "torch")
    assert torch.autograd.gradgradcheck(fn, [inputs[n] for n in names], atol=1e-7)


def test_merge_attentions_is_exact():
    """NA over the neighborhood merged with attention over the extra tokens equals the joint
    softmax of the op with ``additional_keys``."""
    from sweep import Config
    cfg = Config((7, 9), (3, 4), (1, 2), (1, 1), (False, True), 2, 4, 2, 8, False, 3)
    d = make_inputs(cfg, requires_grad=False)
    joint, joint_lse = run(cfg, d, "torch")
    na, na_lse = natkit.na2d(d["query"], d["key"], d["value"], **cfg.kwargs(), return_lse=True)
    q = d["query"].flatten(1, 2)                                # b n h d
    ek = d["additional_keys"].repeat_interleave(2, 2)
    ev = d["additional_values"].repeat_interleave(2, 2)
    logits = torch.einsum("bnhd,behd->bnhe", q, ek) * 8 ** -0.5
    extra_lse = logits.logsumexp(-1)
    extra = torch.einsum("bnhe,behd->bnhd", logits.softmax(-1), ev)
    out, lse = natkit.merge_attentions([na.flatten(1, 2), extra], [na_lse.flatten(1, 2),
                                                                   extra_lse])
    torch.testing.assert_close(out, joint.flatten(1, 2), atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, joint_lse.flatten(1, 2), atol=1e-12, rtol=0)


def test_portable_backend_computes_in_float32_under_autocast():
    """Autocast would run the portable backend's products in float16 again: logits of
    these queries overflow there (NaN), not in the float32 the backend computes in."""
    q = torch.randn(1, 12, 2, 8, generator=torch.Generator().manual_seed(0)) * 200
    with torch.autocast("cpu", dtype=torch.float16):
        got = natkit.na1d(q, q, q, 3, backend="torch")
    want = natkit.na1d(q.double(), q.double(), q.double(), 3, backend="reference")
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)


def test_merge_attentions_leaves_out_parts_that_attended_nothing():
    """A part with lse -inf (no key) has weight 0 even when its output is NaN (0/0); with
    every part empty the output is 0 and the lse -inf; no NaN in any gradient."""
    o = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    l = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    nan = torch.full_like(o, math.nan).requires_grad_()
    none = torch.full_like(l, -math.inf).requires_grad_()
    out, lse = natkit.merge_attentions([o, nan], [l, none])
    torch.testing.assert_close(out, o, atol=1e-15, rtol=0)
    torch.testing.assert_close(lse, l, atol=1e-15, rtol=0)
    (out.sum() + lse.sum()).backward()
    for t in (o, l, nan, none):
        assert torch.isfinite(t.grad).all()
    out, lse = natkit.merge_attentions([nan, nan], [none, none])
    assert not out.any() and (lse == -math.inf).all()
    nan.grad = none.grad = None
    (out.sum() + torch.where(lse.isinf(), 0, lse).sum()).backward()
    assert torch.isfinite(nan.grad).all() and torch.isfinite(none.grad).all()


def test_merge_attentions_errors():
    o, l = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="lses"):
        natkit.merge_attentions([o, o], [l])
    with pytest.raises(ValueError, match=r"lses\[0\]"):
        natkit.merge_attentions([o], [o])
    with pytest.raises(TypeError):
        natkit.merge_attentions([o], [None])
    with pytest.raises(TypeError, match=r"outputs\[1\] dtype torch.float64"):
        natkit.merge_attentions([o, o.double()], [l, l])
    with pytest.raises(ValueError, match=r"outputs\[0\] must be"):
        natkit.merge_attentions([torch.zeros(3)], [torch.zeros(())])


def test_blocked_is_window_attention_and_full_kernel_is_full_attention():
    q, k, v = (torch.randn(2, 14, 21, 4, 16) for _ in range(3))
    rpb = torch.randn(4, 13, 13)
    for backend in ("torch", "reference"):
        torch.testing.assert_close(natkit.na2d(q, k, v, 7, stride=7, backend=backend),
                                   window_attention(q, k, v, (7, 7)), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            natkit.na2d(q, k, v, 7, stride=7, rpb=rpb, backend=backend),
            window_attention(q, k, v, (7, 7), relative_bias_table(rpb, (7, 7))),
            atol=1e-5, rtol=0)
        torch.testing.assert_close(natkit.na2d(q, k, v, (14, 21), backend=backend),
                                   full_attention(q, k, v), atol=1e-5, rtol=0)


def test_non_contiguous_inputs_from_fused_qkv():
    qkv = torch.randn(2, 9, 11, 3, 4, 8)          # [B, H, W, 3, heads, dim] as a fused linear
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    out = natkit.na2d(q, k, v, (3, 5), dilation=(2, 1))
    ref = natkit.na2d(q.contiguous(), k.contiguous(), v.contiguous(), (3, 5), dilation=(2, 1),
                      backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    qt = torch.randn(2, 4, 11, 9, 8).permute(0, 2, 3, 1, 4)  # transposed layout
    out = natkit.na2d(qt, qt, qt, 3)
    torch.testing.assert_close(out, natkit.na2d(qt.contiguous(), qt.contiguous(),
                                                qt.contiguous(), 3), atol=1e-6, rtol=0)


def test_default_scale_and_custom_scale():
    q, k, v = (torch.randn(1, 10, 2, 16, dtype=torch.float64) for _ in range(3))
    a = natkit.na1d(q, k, v, 3)
    b = natkit.na1d(q, k, v, 3, scale=0.25, backend="reference")
    torch.testing.assert_close(a, b)
    c = natkit.na1d(q, k, v, 3, scale=1.0)
    assert not torch.allclose(a, c)


def test_per_dim_wrappers_share_the_generic_entry():
    assert natkit.na1d.__name__ == "na1d" and "height, width" in natkit.na2d.__doc__
    q = torch.randn(1, 5, 6, 7, 2, 4)
    torch.testing.assert_close(natkit.na3d(q, q, q, 3), natkit.neighborhood_attention(q, q, q, 3))
    with pytest.raises(ValueError, match="query must have 5 dims"):
        natkit.na2d(q, q, q, 3)


def test_available_backends_and_explicit_choice():
    names = natkit.available_backends()
    assert "torch" in names and names[-1] == "reference"
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="backend='nope' is not available"):
        natkit.na1d(q, q, q, 3, backend="nope")
    with pytest.raises(TypeError, match="backend must be a str"):
        natkit.na1d(q, q, q, 3, backend=3)


@pytest.mark.parametrize("backend", [None, "torch", "reference"])
def test_empty_batch_gives_empty_outputs_and_zero_gradients(backend):
    """A batch of 0 (e.g. a detector's empty set of crops) runs like any other batch: empty
    output and log-sum-exp of the right shapes and dtypes, and zero gradients of the right
    shapes for every input, RPB and extra tokens included, also under torch.compile."""
    for nd, dtype in ((1, torch.float64), (2, torch.float32), (3, torch.bfloat16)):
        spatial = (9, 8, 7)[:nd]
        q = torch.randn(0, *spatial, 4, 8, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(0, *spatial, 2, 8, dtype=dtype, requires_grad=True) for _ in "kv")
        rpb = torch.randn(4, *(5,) * nd, dtype=dtype, requires_grad=True)
        ek, ev = (torch.randn(0, 3, 2, 8, dtype=dtype, requires_grad=True) for _ in "kv")
        out, lse = natkit.neighborhood_attention(q, k, v, 3, dilation=2, rpb=rpb,
                                                 additional_keys=ek, additional_values=ev,
                                                 return_lse=True, backend=backend)
        assert out.shape == q.shape and out.dtype == dtype and out.requires_grad
        assert lse.shape == q.shape[:-1]
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        (out.sum() + lse.sum()).backward()
        for t in (q, k, v, rpb, ek, ev):
            assert t.grad.shape == t.shape and t.grad.dtype == dtype
            assert not t.grad.any()
    q = torch.randn(0, 9, 9, 2, 8)
    f = torch.compile(lambda q: natkit.na2d(q, q, q, 3, backend=backend), fullgraph=True,
                      backend="aot_eager")
    assert f(q).shape == q.shape
    assert f(torch.randn(2, 9, 9, 2, 8)).shape == (2, 9, 9, 2, 8)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
def test_a_first_call_in_inference_mode_does_not_break_training(backend, monkeypatch):
    """Evaluation before training (e.g. a sanity-check validation under inference_mode) is
    the first call for its grid: what a backend caches must not be inference tensors,
    which autograd cannot save in the training call that follows."""
    monkeypatch.setenv("NATKIT_TRITON_ON_CPU", "1")  # the triton kernels in the interpreter
    shape = (2, 11, 7, 2, 8)  # a grid no other test uses: this call fills the caches
    q = torch.randn(*shape)
    rpb = torch.randn(2, 9, 5)
    with torch.inference_mode():
        natkit.na2d(q, q, q, (5, 3), rpb=rpb, backend=backend)
    x, r = q.clone().requires_grad_(), rpb.clone().requires_grad_()
    natkit.na2d(x, x, x, (5, 3), rpb=r, backend=backend).sum().backward()
    assert x.grad.abs().sum() > 0 and r.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", [None, "torch", "reference"])
def test_fake_tensors_then_real_ones(backend):
    """Shape and memory estimates run models on fake tensors (FakeTensorMode): outputs of
    the right shape, and nothing fake left cached for the real calls that follow."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = (2, 13, 6, 2, 8)  # a grid no other test uses
    with FakeTensorMode():
        q = torch.empty(shape)
        assert natkit.na2d(q, q, q, (5, 3), backend=backend).shape == shape
    q = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(natkit.na2d(q, q, q, (5, 3), backend=backend),
                               natkit.na2d(q, q, q, (5, 3), backend="reference"))


@pytest.mark.parametrize("backend", [None, "torch", "reference"])
def test_zero_extra_tokens_are_no_extra_tokens(backend):
    q, k, v = (torch.randn(2, 9, 10, 4, 8, dtype=torch.float64) for _ in "qkv")
    none = torch.zeros(2, 0, 4, 8, dtype=torch.float64)
    got = natkit.na2d(q, k, v, 3, additional_keys=none, additional_values=none,
                      return_lse=True, backend=backend)
    want = natkit.na2d(q, k, v, 3, return_lse=True, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("seed", range(30))
def test_flop_formula_counts_the_reference_pairs(seed):
    """``natkit._flops`` (what FlopCounterMode reports for the fused ops) counts exactly the
    pairs of the reference's dense mask, causal borders and extra tokens included."""
    from natkit._flops import na_flops
    cfg = random_config(random.Random(5000 + seed))
    p = params(cfg, make_inputs(cfg, requires_grad=False))
    pairs = reference_pairs(p)
    assert na_flops(p) == 4 * cfg.batch * cfg.heads * cfg.head_dim * pairs
    assert na_flops(p, backward=True) == 10 * cfg.batch * cfg.heads * cfg.head_dim * pairs


def test_lse_dtype():
    q = torch.randn(1, 8, 2, 4, dtype=torch.bfloat16)
    out, lse = natkit.na1d(q, q, q, 3, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler, backend):
    """The default backend (here the fused CPU custom op) and the portable backend, whose
    tiling must be traceable (no data-dependent Python values)."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 9, 10, 4, 8, requires_grad=True) for _ in range(3))
    rpb = torch.randn(4, 5, 5, requires_grad=True)

    def fn(q, k, v, rpb):
        return natkit.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    weight = torch.randn(1, 9, 10, 4, 8)  # a loss whose gradient is not uniform
    leaves = (q, k, v, rpb)
    out = compiled(*leaves)
    expected = fn(*leaves)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    got = torch.autograd.grad((out * weight).sum(), leaves)
    for g, e in zip(got, torch.autograd.grad((expected * weight).sum(), leaves)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_torch_compile_fullgraph_with_a_scale_that_varies(backend):
    """A second call with another scale makes torch.compile trace the scale as a symbolic
    float; the argument checks must still trace (math.isfinite on it did not)."""
    torch._dynamo.reset()
    q = torch.randn(1, 12, 2, 8, requires_grad=True)

    def fn(q, scale):
        return natkit.na1d(q, q, q, 3, scale=scale, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for scale in (0.3, 0.45, -2.0):
        out = compiled(q, scale)
        torch.testing.assert_close(out, fn(q, scale), atol=1e-6, rtol=0)
        out.sum().backward()
    with pytest.raises(Exception, match="scale must be finite"):  # dynamo wraps the ValueError
        compiled(q, float("nan"))
    # a symbolic scale out of range: the message names it (formatting the symbolic value
    # directly made dynamo fail with "BUILD_STRING type error" and lose the ValueError)
    with pytest.raises(Exception, match=r"ValueError\('scale must be finite .* got 1e\+39'\)"):
        compiled(q, 1e39)


def test_torch_compile_fullgraph_keeps_the_errors_of_symbolic_sizes():
    """Kernel sizes, strides and dilations that vary between calls become symbolic ints;
    a bad one still raises the ValueError naming it (dynamo could not format them)."""
    torch._dynamo.reset()
    q = torch.randn(1, 6, 7, 2, 8)
    for kwarg, good, bad, message in [
            ("kernel_size", (3, 2), 1, "kernel_size must be >= 2 in every dimension, got 1"),
            ("stride", (1, 2), 4, "stride must satisfy 1 <= stride <= kernel_size, got stride "
                                  "4 with kernel_size 3"),
            ("dilation", (1, 2), 0, r"dilation must be >= 1 in every dimension, got \(0, 1\)")]:
        def fn(q, x, kwarg=kwarg):
            args = {"kernel_size": 3, kwarg: (x, 1) if kwarg == "dilation" else x}
            return natkit.na2d(q, q, q, **args)
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
        for x in good:
            torch.testing.assert_close(compiled(q, x), fn(q, x))
        with pytest.raises(Exception, match=rf"ValueError\('{message}'\)"):
            compiled(q, bad)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_torch_compile_dynamic_shapes(backend):
    """``dynamic=True`` makes every size symbolic. The portable backend's tiling is
    specialized to the grid (traced symbolically it took over 5 minutes to compile);
    batch and grid changes must give the eager results."""
    torch._dynamo.reset()

    def fn(q, k, v, rpb):
        return natkit.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    began = time.perf_counter()
    for b, h, w in [(2, 9, 10), (3, 9, 10), (2, 12, 7)]:
        q, k, v = (torch.randn(b, h, w, 4, 8, requires_grad=True) for _ in range(3))
        rpb = torch.randn(4, 5, 5, requires_grad=True)
        out = compiled(q, k, v, rpb)
        torch.testing.assert_close(out, fn(q, k, v, rpb), atol=1e-5, rtol=0)
        out.sum().backward()
    assert time.perf_counter() - began < 120


@pytest.mark.parametrize("backend", [None, "torch"])
def test_torch_compile_many_batch_sizes_compile_once(backend):
    """A new batch size must not recompile once the batch is dynamic (an evaluation loop
    sees many): the portable backend once chunked by the batch and recompiled per size,
    failing at dynamo's recompile limit (8) under fullgraph=True."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda q: natkit.na2d(q, q, q, 3, backend=backend),
                             fullgraph=True, backend="aot_eager")
    for b in [1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 16, 17, 23, 33]:
        q = torch.randn(b, 40, 40, 2, 16)
        torch.testing.assert_close(compiled(q), natkit.na2d(q, q, q, 3, backend=backend),
                                   atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] <= 2  # the first, static, then a dynamic batch


def test_use_backend_steers_calls_that_name_none(monkeypatch):
    from natkit import backends as registry
    reference = registry.backends()["reference"]
    calls = []
    recording = dataclasses.replace(reference,
                                    forward=lambda *a: calls.append(1) or reference.forward(*a))
    monkeypatch.setattr(registry, "_BACKENDS", {**registry.backends(), "reference": recording})
    module = natkit.NeighborhoodAttention2D(16, 2, 3)
    x = torch.randn(1, 6, 7, 16)
    q = torch.randn(1, 6, 7, 2, 8)
    with natkit.use_backend("reference"):
        with natkit.use_backend(None):  # blocks nest; None is the automatic choice
            module(x)
        assert calls == []
        y = module(x)
        assert len(calls) == 1
        natkit.na2d(q, q, q, 3, backend="torch")  # an explicit argument wins
        assert len(calls) == 1
    torch.testing.assert_close(module(x), y, atol=1e-6, rtol=0)
    assert len(calls) == 1  # restored on exit
    with pytest.raises(ValueError, match=r"backend='nope' is not available; available"):
        with natkit.use_backend("nope"):
            pass
    with pytest.raises(TypeError, match="backend must be a str or None, got 3"):
        with natkit.use_backend(3):
            pass


def test_use_backend_blocks_on_threads_may_end_in_any_order():
    """Thread A opens a block, thread B another, A ends first: B's stays in force until it
    ends, and then the automatic choice is back (not A's backend, as a saved-previous-value
    restore would leave)."""
    from natkit import backends as registry
    steps = [threading.Event() for _ in range(4)]
    seen = {}

    def run(name, enter_after, entered, exit_after, exited):
        steps[enter_after].wait(10)
        with natkit.use_backend(name):
            steps[entered].set()
            steps[exit_after].wait(10)
        seen[name] = registry._forced
        steps[exited].set()

    steps[3].set()  # A starts at once
    a = threading.Thread(target=run, args=("torch", 3, 0, 1, 2))
    b = threading.Thread(target=run, args=("reference", 0, 1, 2, 3))
    a.start(), b.start()
    a.join(10), b.join(10)
    assert seen == {"torch": "reference", "reference": None}
    assert registry._forced is None and registry._open == []
    with natkit.use_backend("torch"), natkit.use_backend("torch"):  # same name twice
        pass
    assert registry._forced is None and registry._open == []


def test_use_backend_under_torch_compile():
    """A compiled call re-dispatches when the forced backend changes (dynamo guards on it):
    float64 runs on the portable backend, and forcing the cpu kernel must raise, not reuse
    the graph compiled before."""
    torch._dynamo.reset()
    q = torch.randn(1, 9, 2, 4, dtype=torch.float64)
    compiled = torch.compile(lambda q: natkit.na1d(q, q, q, 3), fullgraph=True,
                             backend="aot_eager")
    compiled(q)
    with natkit.use_backend("cpu"):
        with pytest.raises(Exception, match=r"backend='cpu' \(set by natkit.use_backend\) "
                                            r"cannot run this call: .*float64"):
            compiled(q)
    with natkit.use_backend("reference"):
        torch.testing.assert_close(compiled(q), natkit.na1d(q, q, q, 3), atol=1e-12, rtol=0)


def test_dispatch_explains_refusals(monkeypatch):
    """An explicit backend that cannot run raises with its reason; auto-dispatch skips it."""
    from natkit import backends as registry
    refusing = registry.Backend("triton", "test double", lambda *a: "inputs are not on CUDA",
                                lambda *a: (_ for _ in ()).throw(AssertionError("ran")))
    monkeypatch.setattr(registry, "_BACKENDS", {**registry.backends(), "triton": refusing})
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: inputs are "
                                         "not on CUDA"):
        natkit.na1d(q, q, q, 3, backend="triton")
    torch.testing.assert_close(natkit.na1d(q, q, q, 3),
                               natkit.na1d(q, q, q, 3, backend="reference"))


def test_portable_chunked_rpb_matches_reference():
    from natkit.backends.portable import na_portable
    torch.manual_seed(0)
    q = torch.randn(2, 11, 13, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 11, 13, 2, 8, dtype=torch.float64, requires_grad=True)
            for _ in "kv")
    rpb = torch.randn(4, 5, 9, dtype=torch.float64, requires_grad=True)
    p = check_inputs(2, q, k, v, (3, 5), (2, 1), 1, False, rpb, None, None, None)
    want, want_lse = na_reference(q, k, v, p, rpb)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * g).sum(), (q, k, v, rpb))
    for chunk in (1, 200, 1 << 22):   # one tile per chunk, a few tiles, everything at once
        out, lse = na_portable(q, k, v, p, rpb, tiles=[3, 4], chunk_elements=chunk)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
        torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=0)
        for got, exp in zip(torch.autograd.grad((out * g).sum(), (q, k, v, rpb)), want_grads):
            torch.testing.assert_close(got, exp, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_backend_half_computes_in_float32(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 24, 2, 64).to(dtype) for _ in "qkv")
    out, lse = natkit.na1d(q, k, v, 7, scale=1.0, return_lse=True, backend="reference")
    assert lse.dtype == torch.float32
    want, want_lse = natkit.na1d(q.float(), k.float(), v.float(), 7, scale=1.0,
                                 return_lse=True, backend="reference")
    assert torch.equal(out, want.to(dtype))
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=0)


def test_merge_attentions_half_inputs():
    torch.manual_seed(0)
    o = [torch.randn(2, 5, 3, 8) for _ in range(2)]
    l = [torch.randn(2, 5, 3) * 30 for _ in range(2)]
    for dtype in (torch.float16, torch.bfloat16):
        out, lse = natkit.merge_attentions([t.to(dtype) for t in o], [t.to(dtype) for t in l])
        assert out.dtype == dtype and lse.dtype == torch.float32
        rounded, _ = natkit.merge_attentions([t.to(dtype).float() for t in o],
                                             [t.to(dtype).float() for t in l])
        assert torch.equal(out, rounded.to(dtype))  # computed in float32, rounded once
        exact_lse = torch.logsumexp(torch.stack([t.to(dtype).float() for t in l]), 0)
        torch.testing.assert_close(lse, exact_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_portable_half_output_is_float32_result_rounded(dtype):
    """Computed in float32, the output is within float32 noise of the float32 result on the
    same (rounded) inputs, then rounded once: at most one rounding step of ``dtype`` away."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 40, 2, 64).to(dtype) for _ in "qkv")
    out = natkit.na1d(q, k, v, 9, scale=0.5, backend="torch")
    want = natkit.na1d(q.double(), k.double(), v.double(), 9, scale=0.5, backend="reference")
    err = (out.double() - want).abs()
    ulp = want.abs().to(dtype).double() * torch.finfo(dtype).eps   # a step of dtype
    assert (err <= ulp + 1e-6).all(), float((err - ulp).max())


def test_huge_extra_token_logits_do_not_overflow():
    q = torch.ones(1, 9, 1, 4, dtype=torch.float64)
    k = torch.zeros(1, 9, 1, 4, dtype=torch.float64)
    v = torch.zeros(1, 9, 1, 4, dtype=torch.float64)
    ek = torch.full((1, 1, 1, 4), 500.0, dtype=torch.float64)   # logit 1000 (scale 1/2)
    ev = torch.randn(1, 1, 1, 4, dtype=torch.float64)
    for backend in ("torch", "reference"):
        out, lse = natkit.na1d(q, k, v, 3, additional_keys=ek, additional_values=ev,
                               return_lse=True, backend=backend)
        torch.testing.assert_close(out, ev.expand(1, 9, 1, 4), atol=1e-12, rtol=0)
        torch.testing.assert_close(lse, torch.full_like(lse, 1000.0), atol=1e-9, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_gqa_head_grouping_matches_sdpa(backend):
    torch.manual_seed(0)
    q = torch.randn(2, 9, 6, 8)
    k, v = (torch.randn(2, 9, 2, 8) for _ in "kv")
    out = natkit.na1d(q, k, v, 9, backend=backend)            # kernel = length: full attention
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_meta_tensors_run_for_shapes_and_flops():
    """Meta tensors (shape inference, FLOP counting of models built on the meta device) run
    on the portable backend, also outside any autocast (the meta device has none)."""
    from torch.utils.flop_counter import FlopCounterMode
    q = torch.randn(2, 8, 9, 2, 4, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = natkit.na2d(q, q, q, 3)
    assert out.shape == q.shape and out.device.type == "meta"
    assert counter.get_total_flops() > 0
