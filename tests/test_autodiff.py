"""Autodiff beyond one reverse pass.

- Gradients of gradients (``create_graph=True``) through the fused backends, whose
  backward then recomputes the call with the portable backend's ops
  (``natkit.backends.second_order``). Checked against the portable backend in float64,
  with a loss whose incoming gradients depend on ``out`` and ``lse`` themselves.
- torch.func transforms and forward-mode AD, which run the portable backend.
"""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch

import natkit
from sweep import Config, assert_fa_close, make_inputs, random_config

CONFIGS = [random_config(random.Random(seed), nd=1 + seed % 3, max_tokens=150)
           for seed in range(6)]
# Every feature at least once among the configurations above.
CONFIGS += [Config((7, 6), (3, 3), (2, 1), (1, 2), (False, False), 2, 2, 1, 8, True, 3),
            Config((9,), (4,), (2,), (1,), (True,), 1, 2, 2, 4, False, 0)]


def penalized(c: Config, inputs: dict, backend: str, order: int = 2):
    """First-order gradients of a loss of ``out`` and ``lse``, then the gradients of the
    sum of their squares (``order - 1`` times): returns ``(first, last)`` by input name."""
    out, lse = natkit.neighborhood_attention(
        inputs["query"], inputs["key"], inputs["value"], **c.kwargs(), rpb=inputs["rpb"],
        additional_keys=inputs["additional_keys"], additional_values=inputs["additional_values"],
        return_lse=True, backend=backend)
    names = [n for n, t in inputs.items() if t is not None]
    xs = [inputs[n] for n in names]
    loss = out.double().sin().sum() + (lse.double() * 0.5).cos().sum()
    first = None
    for _ in range(order - 1):
        grads = torch.autograd.grad(loss, xs, create_graph=True)
        first = first or dict(zip(names, grads))
        loss = sum((g.double() ** 2).sum() for g in grads)
    return first, dict(zip(names, torch.autograd.grad(loss, xs)))


def check(c: Config, backend: str, dtype=torch.float32, order: int = 2):
    torch.manual_seed(0)
    exact = make_inputs(c, torch.float64)
    got_in, low_in = ({n: None if t is None else t.detach().to(dtype).requires_grad_()
                       for n, t in exact.items()} for _ in range(2))
    # FlashAttention's rule compares with the reference on the same (rounded) inputs
    ref_in = {n: None if t is None else t.detach().double().requires_grad_()
              for n, t in got_in.items()}
    got = penalized(c, got_in, backend, order)
    ref = penalized(c, ref_in, "torch", order)
    low = penalized(c, low_in, "torch", order)
    for which, (g, r, lo) in enumerate(zip(got, ref, low)):  # first order, then the last
        for name in r:
            assert g[name].dtype == dtype and g[name].shape == r[name].shape
            assert_fa_close(f"{name} ({which})", g[name], r[name], lo[name], dtype,
                            rel_floor=1e-5)


@pytest.mark.parametrize("c", CONFIGS, ids=str)
def test_cpu_second_order(c):
    check(c, "cpu")


def test_cpu_second_order_half():
    check(CONFIGS[-2], "cpu", torch.float16)


def test_cpu_third_order():
    check(CONFIGS[-2], "cpu", order=3)


@pytest.mark.parametrize("c", CONFIGS[-2:], ids=str)
def test_triton_second_order(c, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("NATKIT_TRITON_ON_CPU", "1")  # the interpreter runs CPU tensors
    monkeypatch.setenv("NATKIT_TRITON_AUTOTUNE", "0")
    check(c, "triton")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_vmapped_backward_passes(backend, monkeypatch):
    """A plain forward on a fused backend, then its backward vmapped over a batch of
    cotangents: ``autograd.grad(is_grads_batched=True)`` (as ``jacobian``/``hessian`` with
    ``vectorize=True`` use it) and ``torch.func.vmap`` over ``autograd.grad``. Each must
    equal a loop of plain backward passes. (The cpu backward op returned a list, which
    PyTorch's batching fallback cannot handle: both raised.)"""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("NATKIT_TRITON_ON_CPU", "1")
        monkeypatch.setenv("NATKIT_TRITON_AUTOTUNE", "0")
    c = CONFIGS[-2]  # RPB, extra tokens, GQA, dilation, stride
    inputs = make_inputs(c, torch.float32)
    names = [n for n, t in inputs.items() if t is not None]
    leaves = [inputs[n] for n in names]
    out, lse = natkit.neighborhood_attention(
        inputs["query"], inputs["key"], inputs["value"], **c.kwargs(), rpb=inputs["rpb"],
        additional_keys=inputs["additional_keys"], additional_values=inputs["additional_values"],
        return_lse=True, backend=backend)
    g_out, g_lse = torch.randn(3, *out.shape), torch.randn(3, *lse.shape)
    loop = [torch.autograd.grad((out, lse), leaves, (g_out[i], g_lse[i]), retain_graph=True)
            for i in range(3)]
    batched = torch.autograd.grad((out, lse), leaves, (g_out, g_lse), retain_graph=True,
                                  is_grads_batched=True)
    vmapped = torch.func.vmap(lambda a, b: torch.autograd.grad(
        (out, lse), leaves, (a, b), retain_graph=True))(g_out, g_lse)
    for i, name in enumerate(names):
        expected = torch.stack([grads[i] for grads in loop])
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(batched[i], expected, atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(vmapped[i], expected, atol=1e-6, rtol=1e-6, msg=name)


def test_gradient_penalty_through_a_model():
    """An R1-style penalty on a NAT model's input: the fused backend's parameter gradients
    (float32) match the portable backend's (float64)."""
    from natkit.models import create_model

    models = {"cpu": create_model("nat_micro", num_classes=3).eval()}
    models["torch"] = copy.deepcopy(models["cpu"]).double()
    x = torch.randn(2, 1, 20, 20, dtype=torch.float64)
    grads = {}
    for backend, model in models.items():
        dtype = next(model.parameters()).dtype
        xx = x.to(dtype).requires_grad_()
        with natkit.use_backend(backend):
            (g,) = torch.autograd.grad(model(xx).logsumexp(-1).sum(), xx, create_graph=True)
            g.pow(2).sum().backward()
        grads[backend] = {n: p.grad.double() for n, p in model.named_parameters()}
    for name, ref in grads["torch"].items():
        err = (grads["cpu"][name] - ref).abs().max()
        assert err <= 1e-4 * (1 + ref.abs().max()), (name, float(err))


def test_plain_backward_passes_keep_the_fused_kernels(monkeypatch):
    """Only create_graph=True recomputes: training, with gradient checkpointing (both
    kinds) too, runs the fused backward."""
    from natkit.backends import second_order
    from natkit.models import create_model

    def recomputed(*args):
        raise AssertionError("a plain backward took the recomputing path")
    monkeypatch.setattr(second_order, "backward", recomputed)
    model = create_model("nat_micro", num_classes=3)
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 1, 20, 20)).sum().backward()
    x = torch.randn(2, 9, 2, 4, requires_grad=True)
    torch.utils.checkpoint.checkpoint(lambda x: natkit.na1d(x, x, x, 3, backend="cpu"), x,
                                      use_reentrant=True).sum().backward()
    with pytest.raises(AssertionError, match="recomputing path"):
        torch.autograd.grad(natkit.na1d(x, x, x, 3, backend="cpu").sum(), x, create_graph=True)


# torch.func transforms and forward-mode AD: the fused custom ops have reverse-mode formulas
# only (PyTorch would drop their tangents silently), so automatic dispatch runs the portable
# backend's ops under them.
def _scalar(y):
    return y.sin().sum()


TRANSFORMS = {
    "grad": lambda f, x: torch.func.grad(lambda x: _scalar(f(x)))(x),
    "jacrev": lambda f, x: torch.func.jacrev(lambda x: f(x).sum((0, -1)))(x),
    "jvp": lambda f, x: torch.func.jvp(f, (x,), (torch.cos(x),))[1],
    "vmap": lambda f, x: torch.func.vmap(f)(torch.stack([x, x.flip(0) * 0.5])),
    "forward_ad": lambda f, x: _forward_ad(f, x, torch.cos(x)),
}


def _forward_ad(f, x, tangent):
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(x, tangent))).tangent


TRANSFORM_CONFIG = Config((7, 6), (3, 3), (1, 2), (1, 1), (False, False), 2, 2, 1, 4, True, 2)


def _attention_of(inputs: dict, wrt: str, backend):
    def f(x):
        d = dict(inputs, **{wrt: x})
        return natkit.neighborhood_attention(
            d["query"], d["key"], d["value"], **TRANSFORM_CONFIG.kwargs(), rpb=d["rpb"],
            additional_keys=d["additional_keys"], additional_values=d["additional_values"],
            backend=backend)
    return f


@pytest.mark.parametrize("wrt", ["query", "key", "rpb", "additional_keys", "additional_values"])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_torch_func_transforms_and_forward_ad(transform, wrt):
    ref_in = make_inputs(TRANSFORM_CONFIG, torch.float64, requires_grad=False)
    got_in = {n: None if t is None else t.float() for n, t in ref_in.items()}
    apply = TRANSFORMS[transform]
    got = apply(_attention_of(got_in, wrt, None), got_in[wrt])
    ref = apply(_attention_of(ref_in, wrt, "reference"), ref_in[wrt])
    assert got is not None and ref.abs().max() > 0.1
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)


def test_fused_backends_refuse_under_transforms():
    from natkit.backends import TRANSFORM_REASON
    inputs = make_inputs(TRANSFORM_CONFIG, torch.float32, requires_grad=False)
    reason = re.escape(f"backend='cpu' cannot run this call: {TRANSFORM_REASON}")
    for transform in ("grad", "jvp", "vmap", "forward_ad"):
        with pytest.raises(ValueError, match=reason):
            TRANSFORMS[transform](_attention_of(inputs, "query", "cpu"), inputs["query"])
    # outside any transform, the same call runs the fused kernel
    _attention_of(inputs, "query", "cpu")(inputs["query"])


@pytest.mark.parametrize("transform, wrt", [
    ("grad", "key"), ("jacrev", "query"), ("jacrev", "rpb"), ("jvp", "query"),
    ("vmap", "additional_values"), ("vmap", "rpb"), ("forward_ad", "rpb")])
def test_transforms_inside_torch_compile(transform, wrt):
    """Dynamo traces the transform itself and cannot look at wrapped tensors or tangents:
    dispatch reads the transform and dual-level state, which dynamo folds and guards on.
    (Before, the compiled jvp and forward AD dropped the tangents, grad raised, jacrev
    returned garbage (inductor miscompiled the vmapped index_select backward), and vmap
    over the rpb raised: the portable backend added the batched bias in place.)"""
    ref_in = make_inputs(TRANSFORM_CONFIG, torch.float64, requires_grad=False)
    got_in = {n: None if t is None else t.float() for n, t in ref_in.items()}
    apply = TRANSFORMS[transform]
    compiled = torch.compile(lambda x: apply(_attention_of(got_in, wrt, None), x),
                             fullgraph=True, dynamic=False)
    ref = apply(_attention_of(ref_in, wrt, "reference"), ref_in[wrt])
    torch.testing.assert_close(compiled(got_in[wrt]).double(), ref, atol=1e-5, rtol=1e-4)
    # the same compiled call outside any transform still runs the fused kernel
    graphs = []
    plain = torch.compile(_attention_of(got_in, "query", None), fullgraph=True,
                          backend=lambda gm, example: graphs.append(gm) or gm)
    plain(got_in["query"])
    assert any("natkit.cpu_na_forward" in str(n.target) for n in graphs[0].graph.nodes)
