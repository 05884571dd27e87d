"""Isotropic (ViT-like, single-resolution) NAT and DiNAT.

From the DiNAT paper's ablations: 16x16 patch embedding, then 12 blocks at stride 16
with no downsampling and no position embedding (the relative positional biases carry
position). DiNAT-iso alternates dilation 1 with the largest dilation that fits the
feature map (2 at 224x224). Official keys: ``patch_embed.proj``, ``patch_embed.norm``,
``layers.{i}.*``, ``norm``, ``head``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ._layers import (MATCH_PREVIOUS, ClassifierMixin, FeatureInfo, NATLayer, PatchEmbed,
                      check_global_pool, check_int, check_ints, check_model_args, init_weights,
                      no_weight_decay_names, run_blocks, take_indices)
from .nat import build
from ._registry import register_model

__all__ = ["NATIsotropic", "nat_isotropic_small", "nat_isotropic_base",
           "dinat_isotropic_small", "dinat_isotropic_base"]


class NATIsotropic(ClassifierMixin, nn.Module):
    """Isotropic NAT/DiNAT classifier, or backbone (``features_only=True``).

    Args:
        embed_dim, depth, num_heads: width, number of blocks, attention heads.
        patch_size: stem patch size (stride of every feature map).
        kernel_size: neighborhood size (odd).
        dilations: one dilation per block (None = all 1, NAT-iso).
        features_only: backbone mode: ``forward`` returns the NCHW features of the
            ``out_indices`` blocks, each through its own new LayerNorm ``norm{i}``.
        Other arguments as in ``NAT``.
    """

    stem_stride = 16

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 12,
                 patch_size: int = 16, kernel_size: int = 7,
                 dilations: Optional[Sequence[int]] = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, layer_scale: Optional[float] = None,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 features_only: bool = False,
                 out_indices: Sequence[int] = (-1,)):
        super().__init__()
        check_model_args(mlp_ratio, drop_rate, attn_drop_rate, drop_path_rate, layer_scale,
                         in_chans, num_classes, features_only)
        check_int("embed_dim", embed_dim)
        check_int("depth", depth)
        check_int("patch_size", patch_size)
        dilations = [1] * depth if dilations is None else check_ints("dilations", dilations, depth)
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.depth, self.num_heads, self.kernel_size = depth, num_heads, kernel_size
        self.dilations = dilations
        self.in_chans, self.features_only = in_chans, features_only
        self.num_classes = 0 if features_only else num_classes
        self.global_pool = check_global_pool(global_pool)
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.Sequential(*[
            NATLayer(embed_dim, num_heads, kernel_size, dilations[i], mlp_ratio, qkv_bias,
                     qk_scale, drop_rate, attn_drop_rate, dpr[i], layer_scale)
            for i in range(depth)])
        if features_only:
            self.out_indices = take_indices(depth, out_indices, "out_indices")
            for i in self.out_indices:
                self.add_module(f"norm{i}", nn.LayerNorm(embed_dim))
        else:
            self.out_indices = []
            self.norm = nn.LayerNorm(embed_dim)
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = FeatureInfo(
            [dict(num_chs=embed_dim, reduction=patch_size, module=f"layers.{i}")
             for i in range(depth)], self.out_indices or range(depth))
        self.apply(init_weights)

    @classmethod
    def dilations_for(cls, img_size: int, args: dict) -> list[int]:
        """DiNAT-iso dilations at ``img_size``: 1 alternating with ``feature_size // kernel``."""
        patch = check_int("patch_size", args.get("patch_size", cls.stem_stride))
        kernel = check_int("kernel_size", args.get("kernel_size", 7))
        depth = check_int("depth", args.get("depth", 12))
        big = max(1, math.ceil(img_size / patch) // kernel)
        return [1 if i % 2 == 0 else big for i in range(depth)]

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters to exclude from weight decay (rpb and norms)."""
        return no_weight_decay_names(self)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"rpb"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order for timm's layer-wise learning-rate decay: the
        stem, each block, the final norm joining the last block; the head is left to the
        caller."""
        return dict(stem=r"^patch_embed\.",
                    blocks=[(r"^layers\.(\d+)\.", None), (r"^norm\.", MATCH_PREVIOUS)])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _cut_blocks(self, keep: int) -> None:
        """``prune_intermediate_layers``: keeps the first ``keep`` blocks. Every block has
        the final norm's width, so the norm and the head can stay (as in timm's ViT)."""
        self.layers, self.depth = self.layers[:keep], keep

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Features after each requested block (see ``NAT.forward_intermediates``)."""
        self._check_output_fmt(output_fmt)
        take = take_indices(self.depth, indices)
        x = self._stem(x)
        feats = []
        for i, blk in enumerate(self.layers):
            x = run_blocks([blk], x, self.grad_checkpointing)
            if i in take:
                feats.append(self._intermediate(i, x, i == self.depth - 1, norm, output_fmt))
            if (stop_early or intermediates_only) and i == take[-1]:
                break
        if intermediates_only:
            return feats
        return (x if self.features_only else self.norm(x)), feats

    def forward_features(self, x: torch.Tensor):
        """Classifier mode: normalized features ``[B, H/16, W/16, C]`` (NHWC).
        Backbone mode: the list of NCHW output features."""
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        x = self._stem(x)
        x = run_blocks(self.layers, x, self.grad_checkpointing)
        return self.norm(x)

    def forward(self, x: torch.Tensor):
        x = self.forward_features(x)
        return x if self.features_only else self.forward_head(x)


_CFG = dict(first_conv="patch_embed.proj")


@register_model
def nat_isotropic_small(**kwargs) -> NATIsotropic:
    """NAT-iso-Small: 22M parameters, 80.0% ImageNet-1k top-1."""
    arch = dict(embed_dim=384, depth=12, num_heads=12, mlp_ratio=4.0, kernel_size=7,
                drop_path_rate=0.1)
    return build(NATIsotropic, arch, kwargs, **_CFG)


@register_model
def nat_isotropic_base(**kwargs) -> NATIsotropic:
    """NAT-iso-Base: 86M parameters, 81.6% ImageNet-1k top-1."""
    arch = dict(embed_dim=768, depth=12, num_heads=24, mlp_ratio=4.0, kernel_size=7,
                drop_path_rate=0.4)
    return build(NATIsotropic, arch, kwargs, **_CFG)


@register_model
def dinat_isotropic_small(**kwargs) -> NATIsotropic:
    """DiNAT-iso-Small: 22M parameters, 80.8% ImageNet-1k top-1 (dilation 2 at 224)."""
    arch = dict(embed_dim=384, depth=12, num_heads=12, mlp_ratio=4.0, kernel_size=7,
                drop_path_rate=0.1)
    return build(NATIsotropic, arch, kwargs, dilated=True, **_CFG)


@register_model
def dinat_isotropic_base(**kwargs) -> NATIsotropic:
    """DiNAT-iso-Base: 86M parameters, 82.1% ImageNet-1k top-1 (dilation 2 at 224)."""
    arch = dict(embed_dim=768, depth=12, num_heads=24, mlp_ratio=4.0, kernel_size=7,
                drop_path_rate=0.4)
    return build(NATIsotropic, arch, kwargs, dilated=True, **_CFG)
