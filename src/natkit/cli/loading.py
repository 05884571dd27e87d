"""Model + preprocessing from a checkpoint: natkit (``last.pt``/``best.pt``) or official."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..models.convert import (CheckpointMismatchError, from_hf_state_dict, is_hf_state_dict,
                              load_checkpoint, unwrap_state_dict)
from . import checkpoint as ckpt_io
from .common import CLIError, build_model
from .data import folder_preprocess


def load_for_inference(path: str, model_name: Optional[str], use_ema: bool = False,
                       img_size: Optional[int] = None):
    """Returns ``(model, info)``; ``info`` has ``classes`` (or None), ``preprocess`` (or None
    for official checkpoints: derived from the data) and ``model_name``.

    ``path`` is a checkpoint file or a run folder (its ``best.pt``, else its ``last.pt``;
    with ``use_ema`` its ``last.pt``, which keeps the EMA weights beside the raw ones).
    natkit checkpoints carry their model name; ``model_name``, if given, must match.
    Official NAT/DiNAT checkpoints (a state dict, bare or under ``model``/``state_dict``,
    timm's and transformers' layouts included) need ``model_name``; see ``official_model``
    (``img_size``: the input size, which sets DiNAT's dilations)."""
    if os.path.isdir(path):
        path = run_folder_checkpoint(path, use_ema)
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
    model = official_model(ckpt, path, model_name, img_size)
    return model.eval(), {"classes": None, "preprocess": None, "model_name": model_name,
                          "data": None, "official": True}


def run_folder_checkpoint(folder: str, use_ema: bool = False) -> str:
    """The checkpoint a run folder stands for: ``best.pt`` (the weights that validated
    best, what a run delivers), else ``last.pt``; for its EMA weights, ``last.pt``."""
    for name in ("last.pt",) if use_ema else ("best.pt", "last.pt"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CLIError(f"checkpoint {folder!r} is a folder without "
                   f"{'last.pt' if use_ema else 'best.pt or last.pt'}; name a checkpoint file")


def official_model(ckpt: dict, path: str, name: str, img_size: Optional[int] = None):
    """Model ``name`` built as the official checkpoint ``ckpt`` (read from ``path``) was
    trained: its class count from the classifier (``head.weight``), its input channels
    from the stem, at ``img_size`` (DiNAT's dilations depend on it), then loaded exactly.
    Unlike ``create_model(pretrained=...)``, which adapts with a warning, another kernel
    size or input channel count is an error: the checkpoint is not that model's."""
    try:
        sd = unwrap_state_dict(ckpt, source="it")
        sd = from_hf_state_dict(sd) if is_hf_state_dict(sd) else sd
    except ValueError as err:
        raise CLIError(f"checkpoint {path!r}: {err}") from None
    if "head.weight" not in sd:
        raise CLIError(f"checkpoint {path!r} has no classifier (head.weight): eval and "
                       f"predict need an image classification checkpoint")
    with torch.device("meta"):   # the stem's key, without building the weights
        stem = build_model(name).pretrained_cfg["first_conv"] + ".weight"
    kwargs = {"num_classes": sd["head.weight"].shape[0], "img_size": img_size}
    if stem in sd and sd[stem].dim() == 4:
        kwargs["in_chans"] = sd[stem].shape[1]
    model = build_model(name, **kwargs)
    try:
        load_checkpoint(model, sd, adapt=False)
    except CheckpointMismatchError as err:
        raise CLIError(f"checkpoint {path!r} does not load into model {name!r}: "
                       f"{err.detail[:400]}") from None
    return model


def num_outputs(model: torch.nn.Module, in_chans: int, size: int, device) -> int:
    with torch.no_grad():
        return model(torch.zeros(1, in_chans, size, size, device=device)).shape[-1]


def official_preprocess(model: torch.nn.Module, img_size: Optional[int],
                        crop_pct: Optional[float]) -> dict:
    """The model's ImageNet evaluation transform (``pretrained_cfg``: input size, mean/std,
    crop fraction; 224 / ImageNet statistics / 0.875 without one), then the overrides. It
    comes from the model alone: no image file is read."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    in_chans, size, _ = cfg.get("input_size", (3, 224, 224))
    pre = folder_preprocess([], img_size or size, in_chans=in_chans)
    pre["crop_pct"] = crop_pct if crop_pct is not None else cfg.get("crop_pct", 0.875)
    if "mean" in cfg and "std" in cfg:
        pre["mean"], pre["std"] = list(cfg["mean"]), list(cfg["std"])
    return pre
