"""Helpers shared by the subcommands: model construction, evaluation, messages."""

from __future__ import annotations

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
        return models.create_model(name, **kwargs)
    try:
        return models.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = "; ".join(lines[:3])[:400]
        raise CLIError(f"checkpoint {pretrained!r} does not load into model {name!r}: "
                       f"{detail}") from None


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
