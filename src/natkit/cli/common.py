"""Helpers shared by the subcommands: model construction, evaluation, messages."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import torch


class CLIError(ValueError):
    """A user-facing error: printed as ``natkit <cmd>: error: <message>``, exit code 2."""


def list_models() -> list[str]:
    from natkit.models import list_models as _list
    return list(_list())


def build_model(name: str, pretrained: Optional[str] = None, **kwargs) -> torch.nn.Module:
    """``natkit.models.create_model`` with an error that lists the known names."""
    from natkit import models
    names = list_models()
    if name not in names:
        raise CLIError(f"unknown model {name!r}; available models: {', '.join(names)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if pretrained is None:
        try:
            return models.create_model(name, **kwargs)
        except (TypeError, ValueError) as err:  # e.g. bad model_kwargs in a checkpoint
            raise CLIError(f"cannot build model {name!r} with {kwargs}: {err}") from None
    try:
        return models.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = "; ".join(lines[:3])[:400]
        raise CLIError(f"checkpoint {pretrained!r} does not load into model {name!r}: "
                       f"{detail}") from None


def check_number(value, option: str, low=None, high=None, high_open: bool = False,
                 allow_none: bool = True) -> None:
    """``value`` (an option's value) must be a finite number in ``[low, high]`` (``[low,
    high)`` with ``high_open``); None passes when ``allow_none``."""
    if value is None and allow_none:
        return
    ok = (value is not None and (isinstance(value, int) or math.isfinite(value))
          and (low is None or value >= low)
          and (high is None or (value < high if high_open else value <= high)))
    if not ok:
        rng = (f"in [{low}, {high}{')' if high_open else ']'}" if high is not None
               else f">= {low}" if low is not None else "finite")
        raise CLIError(f"{option} must be {rng}, got {value}")


MAX_IMG_SIZE = 4096  # larger inputs would fail later, allocating the activations
MAX_RESIZE = 8192  # the eval transform's short side: 8192 x 8192 RGB is 200 MB in PIL


def add_preprocess_options(p) -> None:
    """eval's and predict's ``--img-size`` and ``--crop-pct`` (official checkpoints)."""
    p.add_argument("--img-size", type=int, help="official checkpoints: input size (the "
                                                "model's, 224; at most 4096)")
    p.add_argument("--crop-pct", type=float,
                   help="official checkpoints: the short side is resized to img-size / "
                        "crop-pct, then the center img-size square is cropped (the model's, "
                        "0.875; in (0, 1])")


def check_img_size(value) -> None:
    """``--img-size``: None or an integer in ``[1, MAX_IMG_SIZE]``."""
    check_number(value, "--img-size", 1)
    if value is not None and value > MAX_IMG_SIZE:
        raise CLIError(f"--img-size must be at most {MAX_IMG_SIZE}, got {value}")


def check_crop_pct(value) -> None:
    """``--crop-pct`` of eval and predict: None or a fraction in (0, 1] (``check_resize``
    bounds it from below once the input size is known)."""
    if value is not None and not (math.isfinite(value) and 0 < value <= 1):
        raise CLIError(f"--crop-pct must be in (0, 1], got {value}")


def check_resize(preprocess: dict) -> None:
    """The evaluation transform resizes the short side of every image to
    ``floor(img_size / crop_pct)`` pixels: at most ``MAX_RESIZE`` (a tiny ``--crop-pct``
    made PIL fail allocating the resized image)."""
    size, crop = preprocess["img_size"], preprocess.get("crop_pct", 1.0)
    side = math.floor(size / crop)
    if preprocess["kind"] != "digits" and side > MAX_RESIZE:
        raise CLIError(f"--crop-pct {crop} with input size {size} would resize images to "
                       f"{side} pixels on the short side (floor(size / crop-pct); at most "
                       f"{MAX_RESIZE}): use a larger --crop-pct or a smaller --img-size")


def check_writable(path: str, option: str, folder: bool, inputs=()) -> None:
    """Fails early, before any long work, when the output ``path`` cannot be created: an
    existing entry of the wrong kind, one of the command's ``inputs`` (it would be
    overwritten), or (files) a parent that is not an existing folder, or (folders) an
    ancestor that is a file."""
    if not path:
        raise CLIError(f"{option} must not be empty")
    full = os.path.abspath(path)
    if os.path.exists(full):
        if os.path.isdir(full) != folder:
            raise CLIError(f"{option} {path!r} is a {'file' if folder else 'folder'}, not a "
                           f"{'folder' if folder else 'file'}")
        for src in inputs:
            if os.path.exists(src) and os.path.samefile(full, src):
                raise CLIError(f"{option} {path!r} would overwrite the input {src!r}")
        return
    parent = os.path.dirname(full)
    if folder:
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CLIError(f"{option} {path!r}: {parent!r} is not an existing folder")


def write_json(obj, path: str, option: str) -> None:
    try:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
    except OSError as err:
        raise CLIError(f"cannot write {option} {path!r}: {err.strerror or err}") from None


def make_folder(path: str, option: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create the {option} folder {path!r}: "
                       f"{err.strerror or err}") from None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 on GPUs that support it, else fp16 on GPU; off on CPU."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise CLIError(f"--amp must be one of auto, bf16, fp16, none; got {amp!r}")


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, dist_ctx=None, progress=None):
    """Loss (plain cross-entropy), top-1 and top-5 accuracy in percent, summed over ranks."""
    from . import distributed
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        totals += torch.stack([
            torch.nn.functional.cross_entropy(logits, y, reduction="sum").double(),
            hit[:, 0].sum().double(), hit.any(1).sum().double(),
            torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
        if progress is not None:
            progress.update(len(y))
    loss, top1, top5, n = (distributed.all_sum(dist_ctx, totals.tolist())
                           if dist_ctx is not None else totals.tolist())
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "count": int(n)}


def info(msg: str) -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"natkit: warning: {msg}", file=sys.stderr, flush=True)
