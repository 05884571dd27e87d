"""Backend registry and dispatch.

Each backend is a ``Backend``: a ``can_run`` predicate that returns ``None`` when it
can run the call or a sentence saying why not, and a ``forward`` returning
``(out, lse)``. ``backend=None`` picks the first backend of ``PRIORITY`` that can run;
an explicit backend that cannot run raises a ``ValueError`` with its reason.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.autograd import forward_ad

from .._checks import NAParams

logger = logging.getLogger("natkit")


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    # (params, query, rpb, requires_grad) -> None if runnable, else the reason
    can_run: Callable[..., Optional[str]]
    # (query, key, value, params, rpb, additional_keys, additional_values) -> (out, lse)
    forward: Callable
    # runs torch custom ops (reverse-mode autograd formulas only; see ``plain_ops_reason``)
    custom_ops: bool = False


def exporting_to_onnx() -> bool:
    """ONNX export is tracing this call (through ``torch.export``). The fused backends'
    custom ops have no ONNX translation, so they refuse and the portable backend's plain
    PyTorch ops are exported."""
    if not torch.compiler.is_exporting():
        return False
    onnx = sys.modules.get("torch.onnx")  # never imported: no ONNX export under way
    return onnx is not None and onnx.is_in_onnx_export()


ONNX_REASON = "ONNX export runs the portable backend (the fused kernels have no ONNX translation)"
TRACE_REASON = ("torch.jit.trace records the portable backend's ops (the fused kernels' custom "
                "ops cannot be traced)")
TRANSFORM_REASON = ("a torch.func transform (grad, vmap, jvp, jacrev, ...) or forward-mode AD "
                    "sees this call; the portable backend's ops run under it (the fused "
                    "kernels have reverse-mode formulas only)")


def plain_ops_reason(tensors) -> Optional[str]:
    """Why this call must run on plain PyTorch ops (the portable backend), or None.

    The fused backends are custom ops: with no ONNX translation, not traceable by
    ``torch.jit.trace``, and with no forward-mode or batching rule (PyTorch would drop
    their tangents silently, not raise).
    """
    if exporting_to_onnx():
        return ONNX_REASON
    if torch.jit.is_tracing():
        return TRACE_REASON
    if transformed(tensors):
        return TRANSFORM_REASON
    return None


def transformed(tensors) -> bool:
    """A ``torch.func`` transform (grad, vmap, jvp, ...) wraps one of ``tensors``, or one
    carries a forward-AD tangent. Under ``torch.compile``, where dynamo cannot inspect
    wrapped tensors or tangents: any transform or dual level is active (two global states
    that dynamo folds to constants and guards on)."""
    if torch.compiler.is_compiling():
        return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    return any(t is not None and (torch._C._functorch.is_functorch_wrapped_tensor(t)
                                  or forward_ad.unpack_dual(t).tangent is not None)
               for t in tensors)


def _reference() -> Backend:
    from .reference import na_reference
    return Backend("reference", "dense-mask specification (tests' oracle; O(N^2) memory)",
                   lambda *a: None,
                   lambda q, k, v, p, rpb, ak, av: na_reference(q, k, v, p, rpb, ak, av))


def _portable() -> Backend:
    from .portable import na_portable
    return Backend("torch", "portable PyTorch ops, any device (query tiles attend their key box)",
                   lambda *a: None, na_portable)


def _optional(module: str) -> Optional[Backend]:
    """Backends with optional dependencies expose ``BACKEND`` in ``natkit.backends.<module>``."""
    try:
        return importlib.import_module(f"{__name__}.{module}").BACKEND
    except ImportError as err:  # the module itself is missing or its dependency is
        logger.debug("natkit backend %s unavailable: %s", module, err)
        return None


def _registry() -> dict[str, Backend]:
    found = [_optional("triton"), _optional("cpu"), _portable(), _reference()]
    return {b.name: b for b in found if b is not None}


# Built at import, not lazily: torch.compile cannot trace the imports inside a compiled call.
_BACKENDS: dict[str, Backend] = _registry()

# Order of preference for ``backend=None``; the reference is never picked automatically.
PRIORITY = ("triton", "cpu", "torch")


def backends() -> dict[str, Backend]:
    return _BACKENDS


def available_backends() -> list[str]:
    """Names of the backends installed in this environment, fastest first."""
    names = [n for n in PRIORITY if n in backends()]
    return names + ["reference"]


# Set by ``use_backend``: the backend of calls that name none (None: the fastest), the
# name of the latest block still open (in ``_open``, as ``[name]`` tokens in entry order).
_forced: Optional[str] = None
_open: list[list] = []
_open_lock = threading.Lock()


def _check_name(name) -> None:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str or None, got {name!r}")
    if name not in backends():
        raise ValueError(f"backend={name!r} is not available; available backends: "
                         f"{available_backends()}")


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Within the ``with`` block, every call that passes no ``backend`` (modules and models
    included) runs on ``name``, as if it passed it: a call that backend cannot run raises
    the reason. ``None`` restores the automatic choice. Process-wide, like PyTorch's
    backend flags; blocks nest, and blocks open on several threads may end in any order:
    the latest block still open decides."""
    global _forced
    if name is not None:
        _check_name(name)
    token = [name]  # identity, not value: two open blocks may name the same backend
    with _open_lock:
        _open.append(token)
        _forced = name
    try:
        yield
    finally:
        with _open_lock:
            _open[:] = [t for t in _open if t is not token]
            _forced = _open[-1][0] if _open else None


def require_portable(reason: str) -> None:
    """For a call only the portable backend can run (attention dropout in the modules):
    raises if ``use_backend`` set another backend, as that backend would itself."""
    if _forced is not None and _forced != "torch":
        raise ValueError(f"backend={_forced!r} (set by natkit.use_backend) cannot run this "
                         f"call: {reason}")


def choose_backend(name: Optional[str], p: NAParams, query, rpb, requires_grad: bool,
                   tensors=()) -> Backend:
    """The backend to run this call: ``name`` if given (else ValueError), else the one
    ``use_backend`` set, else the fastest that can run it. ``tensors``: every tensor
    argument of the call (query, key, value, rpb, extra tokens)."""
    registry = backends()
    plain_reason = plain_ops_reason(tensors or (query, rpb))

    def refusal(backend: Backend) -> Optional[str]:
        if backend.custom_ops and plain_reason is not None:
            return plain_reason
        return backend.can_run(p, query, rpb, requires_grad)

    source = ""
    if name is None and _forced is not None:
        name, source = _forced, " (set by natkit.use_backend)"
    if name is not None:
        _check_name(name)
        reason = refusal(registry[name])
        if reason is not None:
            raise ValueError(f"backend={name!r}{source} cannot run this call: {reason}")
        return registry[name]
    for candidate in PRIORITY:
        backend = registry.get(candidate)
        if backend is None:
            continue
        reason = refusal(backend)
        if reason is None:
            return backend
        if not torch.compiler.is_compiling():  # logging calls break torch.compile(fullgraph=True) graphs
            logger.debug("natkit: backend %s refused: %s", candidate, reason)
    raise AssertionError("the portable backend accepts every validated call")
