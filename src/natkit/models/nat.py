"""Neighborhood Attention Transformer (NAT), hierarchical vision backbone.

Hassani et al., "Neighborhood Attention Transformer", CVPR 2023. Overlapping
convolutional stem (stride 4), four levels of neighborhood-attention blocks with
convolutional downsampling between them, LayerNorm + average pooling + linear head.
State-dict keys and shapes are the official checkpoints' (``patch_embed.proj.{0,1}``,
``levels.{i}.blocks.{j}.attn.qkv``, ``levels.{i}.downsample.reduction``, ``norm``,
``head``); backbone mode adds the official detection backbone's ``norm{i}``.

The ``NAT`` class also serves DiNAT (``dinat.py``: same network, per-block dilations)
and, through its ``_make_stem``/``_make_downsample`` hooks, DiNAT_s.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ._layers import (MATCH_PREVIOUS, ClassifierMixin, ConvDownsampler, ConvTokenizer,
                      FeatureInfo, Stage, check_global_pool, check_int, check_ints,
                      check_model_args, init_weights, is_int, level_dilations,
                      no_weight_decay_names, take_indices)
from ._registry import default_cfg, register_model

__all__ = ["NAT", "nat_micro", "nat_mini", "nat_tiny", "nat_small", "nat_base"]


def _per_level(name: str, value, levels: int) -> list[int]:
    """``value`` (one positive int, or one per level) as a list of ``levels`` ints."""
    return check_ints(name, [value] * levels if is_int(value) else value, levels)


class NAT(ClassifierMixin, nn.Module):
    """Hierarchical NAT/DiNAT classifier, or backbone (``features_only=True``).

    Args:
        embed_dim: channels of level 0 (level i has ``embed_dim * 2**i``).
        depths, num_heads: blocks and attention heads per level.
        kernel_size: neighborhood size (int, or one per level; odd).
        dilations: per level, one dilation per block (DiNAT); None = all 1 (NAT).
        mlp_ratio: MLP hidden width / dim.
        layer_scale: initial value of the per-channel residual scales ``gamma1/2``
            (None = no layer scale).
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks.
        num_classes: classifier outputs (0 = no head; ``forward`` returns pooled features).
        features_only: backbone mode: no final norm or head; ``forward`` returns the
            features of the ``out_indices`` levels (default: all) before their
            downsampling, each through its own new LayerNorm ``norm{i}``, NCHW, at
            strides 4, 8, 16, 32.
    """

    _stages_attr = "levels"   # the official module name of the stage list
    stem_stride = 4

    def __init__(self, embed_dim: int = 64, depths: Sequence[int] = (3, 4, 18, 5),
                 num_heads: Sequence[int] = (2, 4, 8, 16),
                 kernel_size: Union[int, Sequence[int]] = 7,
                 dilations: Optional[Sequence[Sequence[int]]] = None, mlp_ratio: float = 3.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, layer_scale: Optional[float] = None,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None):
        super().__init__()
        check_model_args(mlp_ratio, drop_rate, attn_drop_rate, drop_path_rate, layer_scale,
                         in_chans, num_classes, features_only)
        check_int("embed_dim", embed_dim, minimum=2)
        depths = check_ints("depths", depths)
        levels = len(depths)
        num_heads = _per_level("num_heads", num_heads, levels)
        kernels = _per_level("kernel_size", kernel_size, levels)
        if dilations is None:
            dilations = [[1] * d for d in depths]
        if not isinstance(dilations, (list, tuple)):
            raise TypeError(f"dilations must be a list of per-level lists, got {dilations!r}")
        if len(dilations) != levels:
            raise ValueError(f"dilations must hold one list per level with one dilation per "
                             f"block (depths={depths}), got {dilations!r}")
        dilations = [check_ints(f"dilations[{i}]", d, n)
                     for i, (d, n) in enumerate(zip(dilations, depths))]

        self.embed_dim, self.depths, self.num_heads = embed_dim, depths, num_heads
        self.kernel_size, self.dilations = kernels, dilations
        self.dims = [embed_dim * 2 ** i for i in range(levels)]
        self.num_features = self.head_hidden_size = self.dims[-1]
        self.in_chans, self.features_only = in_chans, features_only
        self.num_classes = 0 if features_only else num_classes
        self.global_pool = check_global_pool(global_pool)

        self.patch_embed = self._make_stem(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages = []
        for i in range(levels):
            first = sum(depths[:i])
            stages.append(Stage(
                self.dims[i], depths[i], num_heads[i], kernels[i], dilations[i], mlp_ratio,
                qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[first:first + depths[i]],
                layer_scale, self._make_downsample(self.dims[i]) if i < levels - 1 else None))
        setattr(self, self._stages_attr, nn.ModuleList(stages))

        if features_only:
            self.out_indices = take_indices(levels, out_indices, "out_indices")
            for i in self.out_indices:
                self.add_module(f"norm{i}", nn.LayerNorm(self.dims[i]))
        else:
            self.out_indices = []
            self.norm = nn.LayerNorm(self.num_features)
            self.head = (nn.Linear(self.num_features, num_classes) if num_classes > 0
                         else nn.Identity())
        self.feature_info = FeatureInfo(
            [dict(num_chs=d, reduction=self.stem_stride * 2 ** i, module=f"{self._stages_attr}.{i}")
             for i, d in enumerate(self.dims)], self.out_indices or range(levels))
        self.apply(init_weights)

    @classmethod
    def dilations_for(cls, img_size: int, args: dict) -> list[list[int]]:
        """DiNAT's dilations at ``img_size`` for the architecture ``args`` (``depths``,
        ``kernel_size``): per level, 1 alternating with ``feature_size // kernel``."""
        depths = check_ints("depths", args["depths"])
        kernels = _per_level("kernel_size", args.get("kernel_size", 7), len(depths))
        return [level_dilations(d, math.ceil(img_size / (cls.stem_stride * 2 ** i)), k)
                for i, (d, k) in enumerate(zip(depths, kernels))]

    # -- hooks for DiNAT_s -------------------------------------------------------------
    def _make_stem(self, in_chans: int, dim: int) -> nn.Module:
        return ConvTokenizer(in_chans, dim)

    def _make_downsample(self, dim: int) -> nn.Module:
        return ConvDownsampler(dim)

    @property
    def stages(self) -> nn.ModuleList:
        return getattr(self, self._stages_attr)

    # -- timm-style API ----------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters to exclude from weight decay (rpb and norms)."""
        return no_weight_decay_names(self)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"rpb"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order for timm's layer-wise learning-rate decay: the
        stem, then each level (``coarse``) or each block, a level's downsampler joining its
        last block and the final norm the last block; the head is left to the caller."""
        stages = self._stages_attr
        return dict(stem=r"^patch_embed\.", blocks=rf"^{stages}\.(\d+)\." if coarse else [
            (rf"^{stages}\.(\d+)\.blocks\.(\d+)\.", None),
            (rf"^{stages}\.(\d+)\.downsample\.", MATCH_PREVIOUS),
            (r"^norm\.", MATCH_PREVIOUS)])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _cut_blocks(self, keep: int) -> Optional[int]:
        """``prune_intermediate_layers``: keeps the first ``keep`` levels, the last of them
        without its downsampler; returns the new feature width (None: nothing cut)."""
        if keep == len(self.stages):
            return None
        setattr(self, self._stages_attr, self.stages[:keep])
        self.stages[-1].downsample = None
        for name in ("depths", "num_heads", "kernel_size", "dilations", "dims"):
            setattr(self, name, getattr(self, name)[:keep])
        return self.dims[-1]

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Features of each level before its downsampling.

        Args:
            indices: which levels (None = all, int n = the last n, or a list).
            norm: classifier mode only: pass the last level's features through the
                final ``norm``. (In backbone mode every output goes through its own
                ``norm{i}``.)
            stop_early: stop after the last requested level.
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: return only the list of features.

        Returns:
            ``[features...]`` if ``intermediates_only``, else ``(final, [features...])``
            with ``final`` as ``forward_features`` returns it; when ``stop_early`` ends
            before the last level, ``final`` is that level's NHWC output (before its
            downsampling), without the final norm, which is sized for the last level (as
            in timm's Swin).
        """
        self._check_output_fmt(output_fmt)
        stages = self.stages
        take = take_indices(len(stages), indices)
        x = self._stem(x)
        feats = []
        for i, stage in enumerate(stages):
            pre, x = stage(x)
            if i in take:
                feats.append(self._intermediate(i, pre, i == len(stages) - 1, norm, output_fmt))
            if (stop_early or intermediates_only) and i == take[-1]:
                break
        if intermediates_only:
            return feats
        if i < len(stages) - 1:  # stopped early: the level's output, before downsampling
            return pre, feats
        return (x if self.features_only else self.norm(x)), feats

    def forward_features(self, x: torch.Tensor):
        """Classifier mode: normalized last-level features ``[B, H/32, W/32, C]`` (NHWC).
        Backbone mode: the list of NCHW output features."""
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        x = self._stem(x)
        for stage in self.stages:
            _, x = stage(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor):
        x = self.forward_features(x)
        return x if self.features_only else self.forward_head(x)


def build(cls, arch: dict, kwargs: dict, dilated: bool = False, **cfg) -> nn.Module:
    """Builds ``cls(**arch, **kwargs)`` and attaches its data configuration.

    ``img_size`` (kwargs) sets the data configuration's input size and, for ``dilated``
    models without explicit ``dilations``, DiNAT's per-resolution dilation schedule
    (``cls.dilations_for``).
    """
    kwargs = dict(kwargs)
    img_size = kwargs.pop("img_size", cfg.pop("img_size", 224))
    check_int("img_size", img_size)
    args = {**arch, **kwargs}
    if dilated and "dilations" not in kwargs:
        args["dilations"] = cls.dilations_for(img_size, args)
    model = cls(**args)
    in_chans = args.get("in_chans", 3)
    if in_chans != 3:
        cfg.setdefault("mean", (0.5,) * in_chans)
        cfg.setdefault("std", (0.5,) * in_chans)
    model.pretrained_cfg = default_cfg(input_size=(in_chans, img_size, img_size),
                                       num_classes=model.num_classes, **cfg)
    return model


@register_model
def nat_micro(**kwargs) -> NAT:
    """Tiny 2-level NAT for 32x32 inputs (e.g. handwritten digits); not a published model.

    Defaults: ``in_chans=1``, ``num_classes=10``; about 0.1M parameters.
    """
    arch = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), kernel_size=3, mlp_ratio=2.0,
                drop_path_rate=0.0, in_chans=1, num_classes=10)
    return build(NAT, arch, kwargs, img_size=32, crop_pct=1.0)


@register_model
def nat_mini(**kwargs) -> NAT:
    """NAT-Mini: 20.0M parameters, 81.8% ImageNet-1k top-1."""
    arch = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0,
                drop_path_rate=0.2, kernel_size=7)
    return build(NAT, arch, kwargs)


@register_model
def nat_tiny(**kwargs) -> NAT:
    """NAT-Tiny: 27.9M parameters, 83.2% ImageNet-1k top-1."""
    arch = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0,
                drop_path_rate=0.2, kernel_size=7)
    return build(NAT, arch, kwargs)


@register_model
def nat_small(**kwargs) -> NAT:
    """NAT-Small: 50.7M parameters, 83.7% ImageNet-1k top-1."""
    arch = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0,
                drop_path_rate=0.3, layer_scale=1e-5, kernel_size=7)
    return build(NAT, arch, kwargs)


@register_model
def nat_base(**kwargs) -> NAT:
    """NAT-Base: 89.8M parameters, 84.3% ImageNet-1k top-1."""
    arch = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0,
                drop_path_rate=0.5, layer_scale=1e-5, kernel_size=7)
    return build(NAT, arch, kwargs)
