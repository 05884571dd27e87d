"""Model registry: ``register_model`` entrypoints, ``list_models``, ``create_model``."""

from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Callable, Optional, Union

import torch.nn as nn

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers an entrypoint under its function name (decorator); returns it unchanged."""
    name = fn.__name__
    if _ENTRYPOINTS.get(name, fn) is not fn:
        raise ValueError(f"model name {name!r} is already registered")
    _ENTRYPOINTS[name] = fn
    return fn


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Sorted registered model names, optionally filtered by a shell-style ``pattern``
    (``"dinat_*"``, ``"*tiny*"``)."""
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str or None, got {pattern!r}")
    names = sorted(_ENTRYPOINTS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def create_model(name: str, pretrained: Union[str, os.PathLike, None, bool] = None,
                 **kwargs) -> nn.Module:
    """Builds a registered model.

    Args:
        name: a name from ``list_models()``.
        pretrained: path of a local checkpoint: an official NAT/DiNAT ``.pth`` (bare state
            dict or wrapped in ``"model"``/``"state_dict"``), a natkit one, or a Hugging Face
            ``transformers`` NAT/DiNAT one (``.bin``/``.pth``/``.safetensors``, converted
            on the fly). Loaded strictly: a mismatch raises ``CheckpointMismatchError``
            listing the offending keys. Relative positional biases of another kernel
            size are interpolated (bicubic) with a warning. When ``num_classes`` is given
            and differs from the checkpoint's, or the checkpoint has no classifier, the
            classifier is left freshly initialized (fine-tuning); in backbone mode
            (``features_only=True``) the checkpoint's classifier, final norm and output
            norms of levels not in ``out_indices`` are ignored, and missing output norms
            start fresh.
        **kwargs: ``num_classes``, ``in_chans``, ``drop_path_rate``, ``features_only``,
            ``out_indices``, and architecture overrides (``depths``, ``num_heads``,
            ``embed_dim``, ``kernel_size``, ``dilations``, ``mlp_ratio``, ``layer_scale``,
            ``img_size`` for DiNAT's per-resolution dilations, ...).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {name!r}")
    if name not in _ENTRYPOINTS:
        close = difflib.get_close_matches(name, list(_ENTRYPOINTS), n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown model name {name!r}{hint} (see natkit.models.list_models())")
    if pretrained is False:  # timm's spelling of "no weights"
        pretrained = None
    if pretrained is not None and (isinstance(pretrained, bool)
                                   or not isinstance(pretrained, (str, os.PathLike))):
        raise TypeError(f"pretrained must be a checkpoint path, None or False (natkit hosts "
                        f"no weights), got {pretrained!r}")
    model = _ENTRYPOINTS[name](**kwargs)
    if pretrained is not None:
        from .convert import load_checkpoint
        load_checkpoint(model, pretrained, new_head="num_classes" in kwargs, name="pretrained")
    return model


def default_cfg(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                crop_pct: float = 0.875, num_classes: int = 1000,
                first_conv: str = "patch_embed.proj.0", **extra) -> dict:
    """timm-style data configuration attached to models as ``pretrained_cfg``."""
    return dict(input_size=tuple(input_size), mean=tuple(mean), std=tuple(std),
                crop_pct=crop_pct, interpolation="bicubic", num_classes=num_classes,
                first_conv=first_conv, classifier="head", **extra)
