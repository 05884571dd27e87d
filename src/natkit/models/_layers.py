"""Building blocks shared by the NAT, DiNAT, DiNAT_s and isotropic models.

Module and parameter names follow the official NAT/DiNAT classification code, so the
official checkpoints load with ``strict=True``: ``norm1``, ``attn`` (``qkv``, ``rpb``,
``proj``), ``norm2``, ``mlp`` (``fc1``, ``fc2``), ``gamma1``/``gamma2``; stems
``patch_embed.proj``/``patch_embed.norm``; downsamplers ``reduction``/``norm``.
Feature maps are channels-last ``[batch, height, width, channels]`` between modules.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .._checks import is_int, is_real
from ..modules import NeighborhoodAttention2D


# -- argument checks shared by every model family ------------------------------------------

def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``, else a TypeError/ValueError."""
    if not is_int(value) or value < minimum:
        raise (ValueError if is_int(value) else TypeError)(
            f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_ints(name: str, value, length: Optional[int] = None, minimum: int = 1) -> list[int]:
    """``value``, a non-empty list or tuple of ints >= ``minimum`` (``length`` of them when
    given), as a list."""
    count = "" if length is None else f"{length} "
    msg = f"{name} must be a list or tuple of {count}ints >= {minimum}, got {value!r}"
    if not isinstance(value, (list, tuple)):
        raise TypeError(msg)
    if not value or (length is not None and len(value) != length) or not all(
            is_int(v) and v >= minimum for v in value):
        raise ValueError(msg)
    return [int(v) for v in value]


def check_real(name: str, value, ok: Callable[[float], bool], what: str) -> float:
    """``value`` if it is a finite real number (not a bool) for which ``ok`` holds, else a
    TypeError/ValueError saying that it must be ``what``."""
    real = is_real(value)
    if not real or not math.isfinite(value) or not ok(value):
        raise (ValueError if real else TypeError)(f"{name} must be {what}, got {value!r}")
    return value


def check_model_args(mlp_ratio, drop_rate, attn_drop_rate, drop_path_rate, layer_scale,
                     in_chans, num_classes, features_only) -> None:
    """Validates the constructor arguments that NAT, DiNAT, DiNAT_s and the isotropic
    models share (their architecture arguments are checked by each family)."""
    check_real("mlp_ratio", mlp_ratio, lambda v: v > 0, "a finite number > 0")
    for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                       ("drop_path_rate", drop_path_rate)):
        check_real(name, rate, lambda v: 0 <= v < 1, "a number in [0, 1)")
    if layer_scale is not None:
        check_real("layer_scale", layer_scale, lambda v: v > 0,
                   "None or a finite number > 0")
    check_int("in_chans", in_chans)
    check_int("num_classes", num_classes, minimum=0)
    if not isinstance(features_only, bool):
        raise TypeError(f"features_only must be a bool, got {features_only!r}")


def check_global_pool(global_pool) -> str:
    """timm's ``global_pool``: ``"avg"`` (average over positions) or ``""`` (none)."""
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    return global_pool


def check_images(x, in_chans: int, weight: torch.Tensor) -> None:
    """Checks a model's input: a dense floating-point ``[batch, in_chans, H, W]`` tensor
    with ``H, W >= 1``, on the device and of the dtype of ``weight`` (any float dtype
    under autocast)."""
    layout = f"[batch, in_chans={in_chans}, height, width]"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor {layout}, got {type(x).__name__}")
    if not x.is_floating_point() or x.layout != torch.strided:
        raise TypeError(f"x must be a dense floating-point tensor {layout}, got dtype "
                        f"{x.dtype} (layout {x.layout})")
    if x.dim() != 4 or x.shape[1] != in_chans or min(x.shape[2:]) < 1:
        raise ValueError(f"x must be a {layout} tensor (NCHW) with height, width >= 1, got "
                         f"shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the model is on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x has dtype {x.dtype} but the model {weight.dtype} (cast one of "
                        f"them, or run under torch.autocast)")


def take_indices(num: int, indices, name: str = "indices") -> list[int]:
    """timm's ``indices`` convention: None = all, int n = the last n, sequence = those
    (negative ones count from the end)."""
    if indices is None:
        return list(range(num))
    if is_int(indices):
        if not 0 < indices <= num:
            raise ValueError(f"{name}={indices} must be in [1, {num}] (the last n outputs)")
        return list(range(num - indices, num))
    if not isinstance(indices, (list, tuple, range)):
        raise TypeError(f"{name} must be None, an int or a list of ints, got {indices!r}")
    taken = []
    for i in indices:
        if not is_int(i) or not -num <= i < num:
            raise ValueError(f"{name} must hold ints in [-{num}, {num}), got {indices!r}")
        taken.append(i % num)
    if not taken:
        raise ValueError(f"{name} must not be empty, got {indices!r}")
    return sorted(set(taken))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zeroes whole samples of a residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


# group_matcher suffix: the match joins the previous group (timm's MATCH_PREV_GROUP)
MATCH_PREVIOUS = (99999,)


class FeatureInfo(list):
    """Per-level feature descriptions (``num_chs``, ``reduction``, ``module``), a list over
    every level, with timm's ``FeatureInfo`` accessors: ``channels()``, ``reduction()``,
    ``module_name()``, ``get(key)`` and ``get_dicts()`` describe the ``out_indices`` levels
    (what a backbone returns) unless ``idx`` names levels (an int, or a list)."""

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int]):
        super().__init__(info)
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx=None):
        if idx is None:
            return [self[i][key] for i in self.out_indices]
        if isinstance(idx, (list, tuple)):
            return [self[i][key] for i in idx]
        return self[idx][key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx=None):
        pick = (lambda d: d) if keys is None else (lambda d: {k: d[k] for k in keys})
        if idx is None or isinstance(idx, (list, tuple)):
            return [pick(self[i]) for i in (self.out_indices if idx is None else idx)]
        return pick(self[idx])

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)


class ClassifierMixin:
    """The checked stem, timm's classifier accessors, head and intermediate-feature output
    for models with ``in_chans``, ``patch_embed``, ``pos_drop``, ``head``, ``norm``,
    ``num_features``, ``features_only`` and optional ``norm{i}``."""

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """The entry of every forward method: checks the images ``x``, then embeds them
        (``[B, C, H, W] -> [B, h, w, embed_dim]``)."""
        check_images(x, self.in_chans, self.patch_embed.norm.weight)
        return self.pos_drop(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average-pools NHWC features (``global_pool="avg"``; ``""`` keeps every position,
        the classifier then maps each); returns the features if ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    @property
    def default_cfg(self) -> dict:
        """timm's older name of ``pretrained_cfg``."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    @staticmethod
    def _check_output_fmt(output_fmt: str) -> None:
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")

    def _intermediate(self, i: int, f: torch.Tensor, last: bool, norm: bool,
                      output_fmt: str) -> torch.Tensor:
        """Output ``i`` of ``forward_intermediates``: through its own ``norm{i}`` (backbone
        mode), else through the final norm when ``norm`` asks for it on the last output."""
        out_norm = getattr(self, f"norm{i}", None)
        if out_norm is not None:
            f = out_norm(f)
        elif norm and last and not self.features_only:
            f = self.norm(f)
        return f.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else f

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops the blocks after the last feature output of ``indices`` (timm's API, e.g.
        for ``FeatureGetterNet``); returns ``indices`` as non-negative output indices.

        The final norm and the head go with ``prune_norm`` / ``prune_head``, and also when
        the features now end at another width (hierarchical models: both are sized for the
        last level), as timm does; ``forward_features`` then ends at the last kept output.
        A backbone keeps its ``out_indices`` that remain (at least one must)."""
        take = take_indices(len(self.feature_info), indices)
        keep = take[-1] + 1
        outs = [i for i in self.out_indices if i < keep]
        if self.features_only and not outs:
            raise ValueError(f"indices={indices!r} would prune every output of this backbone "
                             f"(out_indices={self.out_indices})")
        num_features = self._cut_blocks(keep)
        for i in self.out_indices[len(outs):]:
            delattr(self, f"norm{i}")
        self.out_indices = outs
        if not self.features_only:
            if prune_norm or num_features is not None:
                self.norm = nn.Identity()
            if num_features is not None:
                self.num_features = self.head_hidden_size = num_features
            if prune_head or num_features is not None:
                self.reset_classifier(0)
        self.feature_info = FeatureInfo(self.feature_info[:keep], outs or range(keep))
        return take

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replaces the head by a fresh one with ``num_classes`` outputs (0 = none) and,
        unless ``global_pool`` is None, sets the pooling (``"avg"`` or ``""``)."""
        if self.features_only:
            raise ValueError("reset_classifier: a features_only model has no classifier")
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.num_classes = check_int("num_classes", num_classes, minimum=0)
        device = self.patch_embed.norm.weight.device
        self.head = (nn.Linear(self.num_features, num_classes, device=device) if num_classes
                     else nn.Identity())
        self.head.apply(init_weights)


class DropPath(nn.Module):
    """Module form of ``drop_path`` (no parameters)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class Mlp(nn.Module):
    """``fc1 -> GELU -> dropout -> fc2 -> dropout``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class NATLayer(nn.Module):
    """Pre-norm transformer block with 2-D (dilated) neighborhood attention.

    ``x + DropPath(gamma1 * Attn(LN(x)))`` then ``x + DropPath(gamma2 * MLP(LN(x)))``;
    ``gamma1``/``gamma2`` exist only with ``layer_scale`` (initial value).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale=None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation=dilation,
                                            rel_pos_bias=True, qkv_bias=qkv_bias,
                                            qk_scale=qk_scale, attn_drop=attn_drop,
                                            proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        if int(dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio!r} gives a block of width {dim} an MLP "
                             f"with no hidden unit (int(dim * mlp_ratio) = 0)")
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(x))
        x = x + self.drop_path(y if self.gamma1 is None else self.gamma1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma2 is None else self.gamma2 * y)


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, grad_checkpointing: bool):
    """Runs ``blocks`` in order; with ``grad_checkpointing`` each block's activations are
    recomputed in the backward pass instead of stored (only while autograd records)."""
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


class Stage(nn.Module):
    """One resolution of a hierarchical model: ``blocks`` then an optional ``downsample``.

    ``forward`` returns ``(features before downsampling, output)``: backbones use the first.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, kernel_size: int,
                 dilations: Sequence[int], mlp_ratio: float, qkv_bias: bool, qk_scale,
                 drop: float, attn_drop: float, drop_path: Sequence[float],
                 layer_scale: Optional[float], downsample: Optional[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList([
            NATLayer(dim, num_heads, kernel_size, dilations[i], mlp_ratio, qkv_bias, qk_scale,
                     drop, attn_drop, drop_path[i], layer_scale)
            for i in range(depth)])
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor):
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return x, (x if self.downsample is None else self.downsample(x))


class ConvTokenizer(nn.Module):
    """NAT stem: two overlapping 3x3 stride-2 convolutions (no activation), then LayerNorm.

    ``[B, C_in, H, W] -> [B, ceil(H/4), ceil(W/4), dim]``; keys ``proj.0``, ``proj.1``, ``norm``.
    """

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """NAT downsampler: 3x3 stride-2 convolution without bias (dim -> 2 dim), LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PatchEmbed(nn.Module):
    """Swin/ViT stem: non-overlapping ``patch_size`` convolution, then LayerNorm.

    Inputs whose sides are not multiples of ``patch_size`` are zero-padded right/bottom.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin downsampler: concatenates each 2x2 patch (4 dim), LayerNorm, Linear to 2 dim.

    Odd sides are zero-padded right/bottom. The concatenation order (top-left,
    bottom-left, top-right, bottom-right) is the checkpoints'.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(self.norm(x))


def init_weights(module: nn.Module) -> None:
    """The official initialization: Linear trunc-normal(std .02) with zero bias, LayerNorm 1/0.

    (Convolutions keep PyTorch's default; ``rpb`` is initialized by the attention module.)
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that should not be weight-decayed: relative positional biases and
    every LayerNorm's weight and bias."""
    names = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, nn.LayerNorm):
            names.update(prefix + n for n, _ in mod.named_parameters(recurse=False))
        elif isinstance(mod, NeighborhoodAttention2D) and mod.rpb is not None:
            names.add(prefix + "rpb")
    return names


def level_dilations(depth: int, feature_size: int, kernel_size: int) -> list[int]:
    """DiNAT's dilation schedule for one level: 1 (local NA) alternating with the largest
    dilation whose dilated window still fits the feature map, ``feature_size // kernel``.

    At 224x224 this gives the published lists (``[1, 8, 1]``, ``[1, 4, 1, 4]``,
    ``[1, 2] * 9``, ``[1] * 5``); at 384x384 the published 384 ones (``[1, 13, 1]``, ...).
    """
    big = max(1, feature_size // kernel_size)
    return [1 if j % 2 == 0 else big for j in range(depth)]
