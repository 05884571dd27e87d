"""Building blocks shared by the NAT, DiNAT, DiNAT_s and isotropic models.

Module and parameter names follow the official NAT/DiNAT classification code, so the
official checkpoints load with ``strict=True``: ``norm1``, ``attn`` (``qkv``, ``rpb``,
``proj``), ``norm2``, ``mlp`` (``fc1``, ``fc2``), ``gamma1``/``gamma2``; stems
``patch_embed.proj``/``patch_embed.norm``; downsamplers ``reduction``/``norm``.
Feature maps are channels-last ``[batch, height, width, channels]`` between modules.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..modules import NeighborhoodAttention2D


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zeroes whole samples of a residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class ClassifierMixin:
    """timm's classifier accessors, head and intermediate-feature output for models with
    ``head``, ``norm``, ``num_features``, ``features_only`` and optional ``norm{i}``."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average-pools NHWC features; returns the pooled features if ``pre_logits``."""
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

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

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replaces the head by a fresh one with ``num_classes`` outputs (0 = none)."""
        if self.features_only:
            raise ValueError("reset_classifier: a features_only model has no classifier")
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be 'avg' or None, got {global_pool!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        device = self.norm.weight.device
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
