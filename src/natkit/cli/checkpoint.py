"""Training checkpoints: atomic writes, validated reads.

A natkit checkpoint is a ``torch.save`` dict tagged ``natkit_checkpoint`` holding the
model name and constructor arguments, class names, preprocessing, and (for training
checkpoints) optimizer, scheduler, AMP scaler, EMA, epoch and RNG states. Every value is a
tensor or a plain Python container, so it loads with ``torch.load(weights_only=True)``
(no arbitrary pickles).

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows): a crash or a kill during the
write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Optional

import numpy as np
import torch

from .._checks import is_int
from ..models.convert import load_file

FORMAT_VERSION = 1
TAG = "natkit_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the request (message says why)."""


def save_atomic(state: dict, path: str) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def read(path: str) -> dict:
    """Loads any torch checkpoint file as ``natkit.models.create_model(pretrained=...)``
    does (``natkit.models.convert.load_file``: tensors, plain containers and the objects
    timm/mmcv training checkpoints carry; never arbitrary pickles)."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a folder; name the checkpoint file "
                              f"in it (e.g. {os.path.join(path, 'best.pt')!r})")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = load_file(path, f"checkpoint {path!r}")
    except (OSError, ImportError) as err:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {err}") from None
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, expected a "
                              f"dict (a natkit checkpoint or a state dict)")
    return obj


def is_natkit(ckpt: dict) -> bool:
    return ckpt.get(TAG) is not None


def load_natkit(path: str, model: Optional[str] = None, training: bool = False) -> dict:
    """Reads a natkit checkpoint; checks its format, model name, and (``training``) that it
    has the full training state."""
    ckpt = read(path)
    if not is_natkit(ckpt):
        raise CheckpointError(f"{path!r} is not a natkit checkpoint (an official NAT/DiNAT "
                              f"checkpoint needs --model NAME with natkit eval/predict; "
                              f"it cannot be resumed)")
    if not is_int(ckpt[TAG]):
        raise CheckpointError(f"checkpoint {path!r} has an invalid format version "
                              f"{ckpt[TAG]!r} (not written by natkit)")
    if ckpt[TAG] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {ckpt[TAG]}, newer than "
                              f"this natkit ({FORMAT_VERSION}); upgrade natkit")
    needed = ["model_name", "model_kwargs", "model", "classes", "preprocess"]
    if training:
        needed += ["optimizer", "scheduler", "epoch", "rng", "args"]
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}"
                              + (" (not a training checkpoint: cannot resume)" if training else ""))
    kinds = {"model_name": str, "model_kwargs": dict, "model": dict, "classes": list,
             "preprocess": dict}
    wrong = [k for k, kind in kinds.items() if not isinstance(ckpt[k], kind)]
    if wrong:
        raise CheckpointError(f"checkpoint {path!r} is damaged: {wrong} have the wrong type")
    if model is not None and ckpt["model_name"] != model:
        raise CheckpointError(f"checkpoint {path!r} is for model {ckpt['model_name']!r}, "
                              f"not {model!r}")
    return ckpt


def load_state(module: torch.nn.Module, state: dict, path: str, what: str = "model") -> None:
    """``load_state_dict(strict=True)`` with a short, clear error instead of the key dump."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(f"checkpoint {path!r}: the {what} weights do not fit this "
                              f"model ({detail[:300]})") from None


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states, as tensors/plain values."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]),
             "numpy_gauss": float(np_state[4]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
