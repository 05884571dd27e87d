"""Autodiff beyond one reverse pass: torch.func transforms and forward-mode AD."""

from __future__ import annotations

import re

import pytest
import torch

import natkit
from sweep import Config, make_inputs

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


@pytest.mark.parametrize("wrt", ["query", "key", "rpb", "additional_values"])
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
