"""Model + preprocessing from a checkpoint: natkit (``last.pt``/``best.pt``) or official."""

from __future__ import annotations

from typing import Optional

import torch

from . import checkpoint as ckpt_io
from .common import CLIError, build_model
from .data import folder_preprocess


def load_for_inference(path: str, model_name: Optional[str], use_ema: bool = False):
    """Returns ``(model, info)``; ``info`` has ``classes`` (or None), ``preprocess`` (or None
    for official checkpoints: derived from the data) and ``model_name``.

    natkit checkpoints carry their model name; ``model_name``, if given, must match.
    Official NAT/DiNAT ``.pth`` files (a state dict, or ``{'model': state dict}``) need
    ``model_name`` and load through ``natkit.models.create_model(pretrained=path)``."""
    ckpt = ckpt_io.read(path)
    if ckpt_io.is_natkit(ckpt):
        ckpt = ckpt_io.load_natkit(path, model=model_name)
        model = build_model(ckpt["model_name"], **ckpt["model_kwargs"])
        weights = ckpt["model"]
        if use_ema:
            if ckpt.get("ema") is None:
                if "ema_val_top1" in (ckpt.get("metrics") or {}):
                    raise CLIError(f"checkpoint {path!r} holds the EMA weights already (the "
                                   f"best.pt of an --ema run); drop --ema")
                raise CLIError(f"checkpoint {path!r} has no EMA weights (drop --ema)")
            weights = ckpt["ema"]
        ckpt_io.load_state(model, weights, path)
        return model.eval(), {"classes": list(ckpt["classes"]),
                              "preprocess": dict(ckpt["preprocess"]),
                              "model_name": ckpt["model_name"], "data": ckpt.get("data"),
                              "official": False}
    if model_name is None:
        raise CLIError(f"{path!r} is not a natkit checkpoint; for an official NAT/DiNAT "
                       f"checkpoint name its model with --model (e.g. --model nat_tiny)")
    if use_ema:
        raise CLIError("--ema applies to natkit training checkpoints only")
    del ckpt
    model = build_model(model_name, pretrained=path)
    return model.eval(), {"classes": None, "preprocess": None, "model_name": model_name,
                          "data": None, "official": True}


def num_outputs(model: torch.nn.Module, in_chans: int, size: int, device) -> int:
    with torch.no_grad():
        return model(torch.zeros(1, in_chans, size, size, device=device)).shape[-1]


def official_preprocess(model: torch.nn.Module, first_image: str, img_size: Optional[int],
                        crop_pct: Optional[float]) -> dict:
    """The model's ImageNet evaluation transform (``pretrained_cfg``: input size, mean/std,
    crop fraction; 224 / ImageNet statistics / 0.875 without one), then the overrides."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    in_chans, size, _ = cfg.get("input_size", (3, 224, 224))
    pre = folder_preprocess(first_image, img_size or size, in_chans=in_chans)
    pre["crop_pct"] = crop_pct if crop_pct is not None else cfg.get("crop_pct", 0.875)
    if "mean" in cfg and "std" in cfg:
        pre["mean"], pre["std"] = list(cfg["mean"]), list(cfg["std"])
    return pre
