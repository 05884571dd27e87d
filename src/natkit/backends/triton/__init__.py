"""Fused Triton kernels for neighborhood attention (forward + backward), backend ``"triton"``.

- ``window``: the SPEC window formula and tile ranges, in-kernel.
- ``forward`` / ``backward``: the kernels (online-softmax forward; delta, dQ + dRPB, dRPB,
  dK/dV).
- ``configs``: tile shapes / warps / stages, autotuning and caller overrides.
- ``op``: launchers and the ``natkit::triton_na_fwd`` / ``natkit::triton_na_bwd`` custom ops.

Importing this module requires ``triton`` (the registry treats an ImportError as "absent").
"""

from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from .. import Backend
from . import configs
from .configs import TileConfig, override, set_override

MAX_HEAD_DIM = 256


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_compat() -> None:
    """Triton 3.6's interpreter turns scalars into 1-element arrays and calls ``int()`` on them
    for ``range`` bounds, which NumPy >= 2.4 rejects; index through ``.item()`` instead."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_natkit", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._natkit = True
    interpreter._patch_lang_tensor = patched


if interpreting():
    _interpreter_compat()

# At import: the custom ops (and their FLOP formulas, which FlopCounterMode reads when it
# is entered) exist before the first call.
from .op import na_fwd_op  # noqa: E402


def can_run(p, query, rpb, requires_grad) -> str | None:
    """``None`` when the triton backend can run this call, else the reason."""
    if query.dtype == torch.float64:
        return "float64 is not supported by the triton kernels (use float32, float16, bfloat16)"
    if rpb is not None and rpb.dtype == torch.float64:
        return "a float64 rpb is not supported by the triton kernels"
    if p.head_dim > MAX_HEAD_DIM:
        return f"head_dim {p.head_dim} exceeds the triton kernels' maximum {MAX_HEAD_DIM}"
    if query.device.type == "cuda":
        return None
    if interpreting() and query.dtype == torch.bfloat16:
        return "Triton's CPU interpreter computes bfloat16 dots incorrectly (float16/float32 only)"
    if query.device.type == "cpu" and interpreting() and os.environ.get("NATKIT_TRITON_ON_CPU") == "1":
        return None
    return (f"tensors are on {query.device.type}; the triton backend runs on CUDA (on CPU only "
            f"under TRITON_INTERPRET=1 with NATKIT_TRITON_ON_CPU=1)")


def na_triton(query, key, value, p, rpb=None, additional_keys=None, additional_values=None):
    """Returns ``(out, lse)`` through the ``natkit::triton_na_fwd`` custom op (differentiable)."""
    if rpb is not None:
        rpb = rpb.contiguous()  # the kernels index the bias table densely (q/k/v pass strides)
    return na_fwd_op(query, key, value, rpb, additional_keys, additional_values,
                     list(p.kernel_size), list(p.dilation), list(p.stride),
                     [bool(c) for c in p.is_causal], float(p.scale))


BACKEND = Backend("triton", "fused Triton kernels (CUDA): flash-style forward and backward",
                  can_run, na_triton, custom_ops=True)

__all__ = ["BACKEND", "TileConfig", "can_run", "configs", "na_triton", "override", "set_override"]
