"""The fused backends' backward when autograd records it (``create_graph=True``).

The fused kernels compute first-order gradients only, and nothing can differentiate them.
A backward pass that must itself be differentiable (an R1 or gradient penalty, a
Hessian-vector product) instead recomputes the call with the portable backend's PyTorch
ops and takes their gradient with ``torch.func.vjp``, while autograd records it: the
second backward then runs through plain ops, at the portable backend's cost, and so does
any higher order. Plain backward passes (``create_graph=False``, training) never come
here; neither does ``torch.compile``, whose traced backward records nothing.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import NAParams

INPUTS = ("query", "key", "value", "rpb", "additional_keys", "additional_values")


def recorded() -> bool:
    """A backward pass is running with ``create_graph=True`` (autograd records its ops)."""
    return torch.is_grad_enabled()


def backward(p: NAParams, inputs: tuple, grad_out: Optional[torch.Tensor],
             grad_lse: Optional[torch.Tensor]) -> tuple:
    """Differentiable gradients of ``<out, grad_out> + <lse, grad_lse>`` w.r.t. ``inputs``
    (query, key, value, rpb, additional_keys, additional_values; absent ones None), each
    shaped and typed like its input (None for an absent one). ``grad_out``/``grad_lse``
    may be None (zero) or flattened."""
    from .portable import na_portable

    present = [i for i, t in enumerate(inputs) if t is not None]

    def attention(*tensors):
        q, k, v, rpb, ek, ev = _scatter(present, tensors)
        return na_portable(q, k, v, p, rpb, ek, ev)

    (out, lse), vjp = torch.func.vjp(attention, *(inputs[i] for i in present))
    grad_out = (torch.zeros_like(out) if grad_out is None
                else grad_out.reshape(out.shape).to(out.dtype))
    grad_lse = (torch.zeros_like(lse) if grad_lse is None
                else grad_lse.reshape(lse.shape).to(lse.dtype))
    return tuple(_scatter(present, vjp((grad_out, grad_lse))))


def _scatter(present: list, values) -> list:
    """``values`` at the positions ``present`` of the six inputs, None elsewhere."""
    out = [None] * len(INPUTS)
    for i, v in zip(present, values):
        out[i] = v
    return out
