"""Gradients of the fused backward ops, so that gradients of any order exist.

The fused kernels compute first-order gradients only. Their backward ops are still
differentiable: ``register(op, ...)`` gives one an autograd formula that recomputes the
call with the portable backend's PyTorch ops and differentiates its gradient
(``torch.func.vjp`` twice). A loss of a gradient (an R1 or gradient penalty,
``create_graph=True``) thus keeps the fused forward and first backward, and pays the
portable backend's cost for the second backward only. The recomputation runs on the saved
tensors themselves, so autograd can differentiate it again (third order and up).

The backward op is a function of the forward inputs and the incoming gradients; the
forward's ``out`` and ``lse`` it also takes are derived from the inputs, so they get no
gradient of their own (the recomputation accounts for them).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .._checks import NAParams

# The forward's differentiable inputs, then the cotangents the backward op receives.
INPUTS = ("query", "key", "value", "rpb", "additional_keys", "additional_values")
ROLES = INPUTS + ("grad_out", "grad_lse")


def register(op, positions: dict[str, int], params: Callable[[Sequence], NAParams],
             outputs: Callable[[Sequence], Sequence[str]]) -> None:
    """Register autograd on the backward custom op ``op``.

    ``positions`` maps each of ``ROLES`` to its argument index, ``params(args)`` gives the
    call's ``NAParams``, and ``outputs(args)`` names the input each output is the gradient
    of (an output of zero elements stands for an absent input).
    """
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[positions[r]] for r in ROLES))
        ctx.params, ctx.outputs, ctx.num_args = params(inputs), outputs(inputs), len(inputs)

    def backward(ctx, *grads):
        if len(grads) == 1 and isinstance(grads[0], list):  # an op returning list[Tensor]
            grads = grads[0]
        saved = dict(zip(ROLES, ctx.saved_tensors))
        result = _second_order(ctx.params, saved, dict(zip(ctx.outputs, grads)))
        args: list[Optional[torch.Tensor]] = [None] * ctx.num_args
        for role, grad in result.items():
            args[positions[role]] = grad
        return tuple(args)

    op.register_autograd(backward, setup_context=setup_context)


def _second_order(p: NAParams, saved: dict, grads: dict) -> dict:
    """The gradient of ``sum(grads[r] * first[r])`` w.r.t. every saved tensor, where
    ``first[r]`` is the first-order gradient the backward op returned for input ``r``."""
    from .portable import na_portable

    present = [r for r in ROLES if saved.get(r) is not None]
    inputs = [r for r in INPUTS if r in present]
    wanted = [r for r in inputs if grads.get(r) is not None and grads[r].numel() > 0]
    if not wanted:
        return {}

    def attention(*tensors):
        named = dict(zip(inputs, tensors))
        return na_portable(named["query"], named["key"], named["value"], p, named.get("rpb"),
                           named.get("additional_keys"), named.get("additional_values"))

    def first_order(*tensors):  # the wanted first-order gradients, as the backward op's
        xs = dict(zip(present, tensors))
        (out, lse), vjp = torch.func.vjp(attention, *(xs[r] for r in inputs))
        grad_out = xs["grad_out"].reshape(out.shape).to(out.dtype)
        grad_lse = (xs["grad_lse"].reshape(lse.shape).to(lse.dtype) if "grad_lse" in xs
                    else torch.zeros_like(lse))
        first = dict(zip(inputs, vjp((grad_out, grad_lse))))
        return tuple(first[r] for r in wanted)

    ys, vjp = torch.func.vjp(first_order, *(saved[r] for r in present))
    second = vjp(tuple(grads[r].reshape(y.shape).to(y.dtype) for r, y in zip(wanted, ys)))
    return {r: g.reshape(saved[r].shape).to(saved[r].dtype) for r, g in zip(present, second)}
