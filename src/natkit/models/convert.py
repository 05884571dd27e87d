"""Checkpoint loading and Hugging Face ``transformers`` NAT/DiNAT key conversion.

natkit models use the official NAT/DiNAT state-dict layout, so the official ``.pth``
files load as they are. ``transformers``' ``NatModel``/``DinatModel`` (and their
``...ForImageClassification``/``...Backbone``) store the same weights under other
names, with the attention's ``qkv`` split into ``query``/``key``/``value`` and the two
layer scales stacked in ``layer_scale_parameters``; ``from_hf_state_dict`` and
``to_hf_state_dict`` translate between the two.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import warnings
from typing import Mapping, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CheckpointMismatchError", "load_checkpoint", "read_state_dict", "load_file",
           "from_hf_state_dict", "to_hf_state_dict", "is_hf_state_dict",
           "interpolate_rpb"]

logger = logging.getLogger("natkit")

StateDict = dict[str, torch.Tensor]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit a model; ``missing``, ``unexpected`` and ``mismatched``
    (``{key: (checkpoint shape, model shape)}``) name the offending keys; ``notes``, if
    any, say what they amount to and come first in ``detail`` (the message without the
    checkpoint's name)."""

    def __init__(self, source: str, missing, unexpected, mismatched, notes=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), \
            dict(mismatched)
        parts = list(notes)   # what the key lists mean, when known (e.g. another kernel)
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {_clip(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {_clip(self.unexpected)}")
        if self.mismatched:
            items = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
                     for k, (a, b) in self.mismatched.items()]
            parts.append(f"shape mismatches ({len(items)}): {_clip(items)}")
        self.detail = "; ".join(parts)
        super().__init__(f"checkpoint {source} does not match the model: {self.detail}")


def _clip(items, limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# -- reading -------------------------------------------------------------------------------

class _Inert:
    """Stands in for the numpy arrays, scalars and dtypes that training checkpoints carry in
    their metadata (mmcv/mmdetection's ``meta``; natkit reads only the weights): built from
    the file's data without running numpy's code on it, which a crafted dtype state can
    turn into reading raw bytes as object pointers (a crash, or worse)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _inert(*args):
    return _Inert()


def _safe_globals() -> list:
    """What ``torch.load(weights_only=True)`` may build besides tensors: timm's
    ``argparse.Namespace`` (``args``), and inert stand-ins under numpy's names."""
    names = ["numpy.ndarray", "numpy.dtype"]
    if hasattr(np, "dtypes"):   # numpy >= 1.25: dtype classes, by name only
        names += [f"numpy.dtypes.{n}" for n in dir(np.dtypes) if n.endswith("DType")]
    calls = [f"numpy.{core}.multiarray.{f}" for core in ("core", "_core")
             for f in ("_reconstruct", "scalar")]
    return [argparse.Namespace, *((_Inert, n) for n in names), *((_inert, n) for n in calls)]


def load_file(path: str, source: str):
    """The object in a ``torch.save`` or ``.safetensors`` file, read on the CPU with
    ``torch.load(weights_only=True)`` and the ``_safe_globals`` allow-list: natkit never
    unpickles anything that could run code. ``source`` names the file in errors.

    Raises ``ValueError`` when the file holds other pickled objects (naming the first) or
    is not a readable checkpoint; ``OSError`` when the file itself cannot be read.
    """
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file as load_safetensors
        except ImportError as err:
            raise ImportError(f"reading {path!r} needs the 'safetensors' package "
                              f"(pip install safetensors)") from err
    try:
        if path.endswith(".safetensors"):
            return load_safetensors(path, device="cpu")
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:   # the file itself cannot be read (permissions, I/O): as it is
        raise
    except Exception as err:   # torch.load raises anything from EOFError to KeyError
        foreign = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(err), re.I)
        if foreign:
            raise ValueError(f"{source} holds pickled objects besides tensors ({foreign[1]}), "
                             f"which natkit does not unpickle (torch.load weights_only=True); "
                             f"if you trust the file, save its state dict alone") from None
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{source} is not a readable PyTorch checkpoint (corrupt, empty, "
                         f"truncated or another format: {type(err).__name__}"
                         f"{': ' + detail if detail else ''})") from err


def read_state_dict(path: Union[str, os.PathLike], *, name: str = "path") -> StateDict:
    """Reads a checkpoint file into a flat state dict on the CPU.

    Accepts ``torch.save`` files (bare state dict, or one wrapped in ``"model"``,
    ``"state_dict"`` or ``"module"``; timm's and mmcv's training checkpoints included, see
    ``load_file``) and ``.safetensors`` files (needs the ``safetensors`` package). The
    prefixes of ``DistributedDataParallel`` (``module.``), ``torch.compile``
    (``_orig_mod.``) and ``AveragedModel`` (``module.``, and its ``n_averaged`` counter)
    are removed; from a detection/segmentation checkpoint (mmdetection/mmsegmentation) only
    the ``backbone.*`` weights are kept, without the prefix. ``name``: the argument that
    error messages name.
    """
    path = os.fspath(path)
    source = f"{name}={path!r}"
    if os.path.isdir(path):
        raise ValueError(f"{source} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}: checkpoint file not found")
    return unwrap_state_dict(load_file(path, source), source=source)


def unwrap_state_dict(obj, source: str = "checkpoint") -> StateDict:
    """The flat ``{name: tensor}`` mapping inside ``obj`` (see ``read_state_dict``)."""
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds no state dict (expected a mapping of tensors, "
                         f"bare or under 'model'/'state_dict'), got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{source} holds no state dict (expected str keys and tensor "
                             f"values), got the entry {key!r}: {type(value).__name__}")
    # torch.compile wraps in _orig_mod (also inside DDP, or DDP inside it)
    sd = {re.sub(r"(^|\.)_orig_mod\.", r"\1", k): v for k, v in obj.items()
          if k != "n_averaged"}   # AveragedModel's count of averaged models
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):   # a detector's/segmenter's backbone
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


# -- Hugging Face transformers layout ------------------------------------------------------

_HF_PREFIX = re.compile(r"^(?:nat\.|dinat\.)?")
# natkit suffix <- transformers suffix, inside encoder.levels.{i}.layers.{j}.
_HF_BLOCK = [
    ("norm1.", "layernorm_before."),
    ("attn.rpb", "attention.self.rpb"),
    ("attn.proj.", "attention.output.dense."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
]
_HF_TOP = [
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("patch_embed.norm.", "embeddings.norm."),
    ("norm.", "layernorm."),
]


def is_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for state dicts in the ``transformers`` NAT/DiNAT layout."""
    return any(".patch_embeddings.projection." in k or k.startswith("encoder.levels.")
               or ".encoder.levels." in k for k in sd)


def from_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Converts a ``transformers`` NAT/DiNAT state dict to natkit's (the official) layout.

    Handles ``NatModel``/``DinatModel`` (prefix-free), ``...ForImageClassification``
    (``nat.``/``dinat.`` prefix, ``classifier``) and ``...Backbone``
    (``hidden_states_norms.stage{k}`` -> ``norm{k-1}``). Keys it does not recognize are
    kept unchanged, so a strict load reports them.
    """
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        k = _HF_PREFIX.sub("", key, count=1)
        m = re.match(r"encoder\.levels\.(\d+)\.layers\.(\d+)\.(.*)$", k)
        if m:
            base, rest = f"levels.{m[1]}.blocks.{m[2]}.", m[3]
            part = re.match(r"attention\.self\.(query|key|value)\.(weight|bias)$", rest)
            if part:
                qkv.setdefault(f"{base}attn.qkv.{part[2]}", {})[part[1]] = value
                continue
            if rest == "layer_scale_parameters":
                out[base + "gamma1"], out[base + "gamma2"] = value[0].clone(), value[1].clone()
                continue
            for ours, theirs in _HF_BLOCK:
                if rest.startswith(theirs):
                    out[base + ours + rest[len(theirs):]] = value
                    break
            else:
                out[key] = value
            continue
        m = re.match(r"encoder\.levels\.(\d+)\.downsample\.(.*)$", k)
        if m:
            out[f"levels.{m[1]}.downsample.{m[2]}"] = value
            continue
        m = re.match(r"hidden_states_norms\.stage(\d+)\.(.*)$", k)
        if m:
            out[f"norm{int(m[1]) - 1}.{m[2]}"] = value
            continue
        if k.startswith("classifier."):
            out["head." + k[len("classifier."):]] = value
            continue
        for ours, theirs in _HF_TOP:
            if k.startswith(theirs):
                out[ours + k[len(theirs):]] = value
                break
        else:
            out[key] = value
    for name, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"transformers state dict has an incomplete query/key/value "
                             f"set for {name}: only {sorted(parts)}")
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "nat") -> StateDict:
    """Converts a natkit NAT/DiNAT state dict to the ``transformers`` layout.

    ``prefix``: ``"nat"`` or ``"dinat"`` gives ``...ForImageClassification`` keys
    (``{prefix}.embeddings...``, ``classifier``); ``""`` gives bare ``NatModel`` keys.
    Backbone-mode ``norm{i}`` become ``hidden_states_norms.stage{i+1}``.
    """
    if prefix not in ("nat", "dinat", ""):
        raise ValueError(f"prefix must be 'nat', 'dinat' or '', got {prefix!r}")
    pre = f"{prefix}." if prefix else ""
    out: StateDict = {}
    gammas: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.match(r"levels\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
        if m:
            base, rest = f"{pre}encoder.levels.{m[1]}.layers.{m[2]}.", m[3]
            if rest.startswith("attn.qkv."):
                kind = rest[len("attn.qkv."):]
                for name, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{base}attention.self.{name}.{kind}"] = chunk.clone()
            elif rest in ("gamma1", "gamma2"):
                gammas.setdefault(base, {})[rest] = value
            else:
                for ours, theirs in _HF_BLOCK:
                    if rest.startswith(ours):
                        out[base + theirs + rest[len(ours):]] = value
                        break
                else:
                    raise ValueError(f"no transformers name for natkit key {key!r}")
            continue
        m = re.match(r"levels\.(\d+)\.downsample\.(.*)$", key)
        if m:
            out[f"{pre}encoder.levels.{m[1]}.downsample.{m[2]}"] = value
            continue
        m = re.match(r"norm(\d+)\.(.*)$", key)
        if m:
            out[f"hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"] = value
            continue
        if key.startswith("head."):
            out["classifier." + key[len("head."):]] = value
            continue
        for ours, theirs in _HF_TOP:
            if key.startswith(ours):
                out[pre + theirs + key[len(ours):]] = value
                break
        else:
            raise ValueError(f"no transformers name for natkit key {key!r} (only NAT/DiNAT "
                             f"have a transformers layout)")
    for base, g in gammas.items():
        out[base + "layer_scale_parameters"] = torch.stack([g["gamma1"], g["gamma2"]])
    return out


# -- relative positional bias ----------------------------------------------------------

def interpolate_rpb(rpb: torch.Tensor, size) -> torch.Tensor:
    """Resizes a ``[heads, 2k-1, 2k-1]`` bias table to ``size`` (bicubic, as Swin and the
    official 11x11 DiNAT-L checkpoints do)."""
    out = F.interpolate(rpb[None].float(), size=tuple(size), mode="bicubic",
                        align_corners=False)
    return out[0].to(rpb.dtype)


# -- loading ------------------------------------------------------------------------------

def _other_in_chans(weight: torch.Tensor, own: torch.Tensor) -> bool:
    """An RGB checkpoint's first convolution and a model's for another channel count."""
    return (weight.dim() == own.dim() == 4 and weight.shape[1] == 3 and own.shape[1] != 3
            and weight.shape[0] == own.shape[0] and weight.shape[2:] == own.shape[2:])


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """An RGB convolution weight ``[out, 3, kh, kw]`` for ``in_chans`` inputs, as timm adapts
    pretrained stems: summed over RGB for 1 channel; otherwise RGB repeated across the
    channels and scaled by ``3 / in_chans`` (a gray image then gets the RGB model's response
    when ``in_chans`` is 1 or a multiple of 3)."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // 3)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (3 / in_chans)


def _kernel(rpb_shape) -> str:
    """The kernel size of a ``[heads, 2k-1, ...]`` bias table: ``"7"``, or ``"(7, 5)"``."""
    sizes = [(n + 1) // 2 for n in rpb_shape[1:]]
    return str(sizes[0]) if len(set(sizes)) == 1 else str(tuple(sizes))


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping],
                    new_head: bool = False, *, name: str = "checkpoint",
                    adapt: bool = True) -> list[str]:
    """Loads a checkpoint into ``model`` strictly, after the adaptations below.

    - the file is read with ``read_state_dict`` (wrappers and prefixes removed) and a
      ``transformers`` layout is converted (``from_hf_state_dict``);
    - ``rpb`` tables of another kernel size are interpolated bicubically, with a warning;
    - an RGB stem (``pretrained_cfg["first_conv"]``) loads into a model with another
      ``in_chans`` by timm's rule (``adapt_input_conv``), with a warning;
    - backbone-mode models (``features_only``) ignore the checkpoint's classifier and
      final norm, and the output norms ``norm{i}`` of levels not in ``out_indices``; output
      norms the checkpoint lacks stay freshly initialized;
    - with ``new_head`` (the caller chose ``num_classes``), the model's classifier stays
      freshly initialized when the checkpoint's has another size or the checkpoint has
      none, and a checkpoint's classifier is dropped for ``num_classes=0`` (each with a
      warning), for fine-tuning on other classes.

    With ``adapt=False`` (loading a checkpoint into the model it was trained as, e.g. for
    evaluation) another kernel size or input channel count is an error instead.
    Anything else that differs raises ``CheckpointMismatchError`` naming every missing,
    unexpected and mis-shaped key; the model is left unchanged then, and nothing is warned.
    An unreadable file raises a ``ValueError`` naming ``name`` (the caller's argument).

    Returns:
        The model keys that kept their initialization.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(checkpoint, Mapping):
        source, sd = "state dict", unwrap_state_dict(checkpoint, source=name)
    elif isinstance(checkpoint, (str, os.PathLike)):
        source, sd = repr(os.fspath(checkpoint)), read_state_dict(checkpoint, name=name)
    else:
        raise TypeError(f"{name} must be a path or a state dict, got {type(checkpoint).__name__}")
    if is_hf_state_dict(sd):
        sd = from_hf_state_dict(sd)
    own = model.state_dict()
    fresh: list[str] = []
    adapted = []  # warnings, given once the checkpoint is known to load

    if getattr(model, "features_only", False):
        # the classifier's final norm and head, and output norms of levels not asked for
        sd = {k: v for k, v in sd.items() if k in own or not re.match(r"(norm\d*|head)\.", k)}
        fresh += [k for k in own if re.match(r"norm\d+\.", k) and k not in sd]
    head = [k for k in own if k.startswith("head.")]
    theirs = [k for k in sd if k.startswith("head.")]
    classes = getattr(model, "num_classes", "?")
    if not new_head or not (head or theirs):
        reason = None
    elif not head:
        reason = "its classifier is dropped (num_classes=0)"
    elif not theirs:
        reason = f"it has no classifier; the model's (num_classes={classes}) stays freshly " \
                 f"initialized"
    elif any(k in sd and sd[k].shape != own[k].shape for k in head):
        shape = tuple(sd.get("head.weight", sd[theirs[0]]).shape)
        reason = (f"classifier not loaded (checkpoint {shape} vs model num_classes="
                  f"{classes}); the model's stays freshly initialized")
    else:
        reason = None
    if reason:
        adapted.append(reason)
        sd = {k: v for k, v in sd.items() if k not in theirs}
        fresh += head

    notes = []  # with adapt=False, why the checkpoint is not this model's
    resized = [k for k, v in sd.items()
               if k.endswith("rpb") and k in own and v.dim() == own[k].dim() >= 2
               and v.shape != own[k].shape and v.shape[0] == own[k].shape[0]]
    if resized:
        pairs = sorted({(_kernel(sd[k].shape), _kernel(own[k].shape)) for k in resized})
        adapted.append(f"interpolated {len(resized)} relative positional bias tables "
                       f"(bicubic) to the model's kernel size: kernel "
                       + ", ".join(f"{a} -> {b}" for a, b in pairs))
        notes += [f"kernel size {a} in the checkpoint, {b} in the model" for a, b in pairs]
        if adapt:
            sd.update({k: interpolate_rpb(sd[k], own[k].shape[1:]) for k in resized})
    stem = getattr(model, "pretrained_cfg", {}).get("first_conv", "") + ".weight"
    if stem in sd and stem in own and _other_in_chans(sd[stem], own[stem]):
        adapted.append(f"adapted {stem} from 3 input channels to the model's "
                       f"{own[stem].shape[1]} (timm's rule: summed, or repeated and scaled)")
        notes.append(f"3 input channels in the checkpoint, {own[stem].shape[1]} in the model")
        if adapt:
            sd[stem] = adapt_input_conv(sd[stem], own[stem].shape[1])

    missing = [k for k in own if k not in sd and k not in fresh]
    unexpected = [k for k in sd if k not in own]
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
                  if k in own and v.shape != own[k].shape}
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched,
                                      notes=() if adapt else notes)
    model.load_state_dict(sd, strict=False)
    for message in adapted:
        warnings.warn(f"checkpoint {source}: {message}", stacklevel=3)
    if fresh:
        logger.info("natkit: %d model keys kept their initialization: %s", len(fresh),
                    _clip(fresh, 8))
    return fresh
