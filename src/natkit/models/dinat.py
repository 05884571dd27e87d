"""Dilated Neighborhood Attention Transformer: DiNAT and DiNAT_s.

Hassani & Shi, "Dilated Neighborhood Attention Transformer", 2022.

- ``DiNAT`` is NAT (``nat.py``) with every other block using dilated NA: the dilation is
  the largest one whose dilated window fits the level's feature map
  (``feature_size // kernel_size``), so it depends on the input resolution. The
  entrypoints take ``img_size`` (default 224) to derive it, or explicit ``dilations``.
- ``DiNAT_s`` is Swin with windowed attention replaced by NA and shifted-window
  attention by dilated NA: 4x4 patch-embedding stem, patch-merging downsamplers,
  stage list named ``layers`` (the official keys).
"""

from __future__ import annotations

import torch.nn as nn

from ._layers import PatchEmbed, PatchMerging
from ._registry import register_model
from .nat import NAT, build

__all__ = ["DiNAT", "DiNAT_s", "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base",
           "dinat_large", "dinat_large_384", "dinat_s_tiny", "dinat_s_small", "dinat_s_base",
           "dinat_s_large", "dinat_s_large_384"]


class DiNAT(NAT):
    """NAT with per-block dilations (see ``NAT`` for the arguments)."""


class DiNAT_s(NAT):
    """Swin-like DiNAT: non-overlapping 4x4 patch stem and patch merging.

    Same arguments as ``NAT``; defaults are DiNAT_s-Tiny's (``mlp_ratio=4``).
    """

    _stages_attr = "layers"

    def __init__(self, embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 mlp_ratio: float = 4.0, **kwargs):
        super().__init__(embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, **kwargs)

    def _make_stem(self, in_chans: int, dim: int) -> nn.Module:
        return PatchEmbed(in_chans, dim, patch_size=4)

    def _make_downsample(self, dim: int) -> nn.Module:
        return PatchMerging(dim)


_S_CFG = dict(first_conv="patch_embed.proj")


@register_model
def dinat_mini(**kwargs) -> DiNAT:
    """DiNAT-Mini: 20.0M parameters, 81.8% ImageNet-1k top-1."""
    arch = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0,
                drop_path_rate=0.2, kernel_size=7)
    return build(DiNAT, arch, kwargs, dilated=True)


@register_model
def dinat_tiny(**kwargs) -> DiNAT:
    """DiNAT-Tiny: 27.9M parameters, 82.7% ImageNet-1k top-1."""
    arch = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0,
                drop_path_rate=0.2, kernel_size=7)
    return build(DiNAT, arch, kwargs, dilated=True)


@register_model
def dinat_small(**kwargs) -> DiNAT:
    """DiNAT-Small (no layer scale, unlike NAT-Small): 50.7M parameters, 83.8% top-1."""
    arch = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0,
                drop_path_rate=0.3, kernel_size=7)
    return build(DiNAT, arch, kwargs, dilated=True)


@register_model
def dinat_base(**kwargs) -> DiNAT:
    """DiNAT-Base: 89.8M parameters, 84.4% ImageNet-1k top-1."""
    arch = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0,
                drop_path_rate=0.5, layer_scale=1e-5, kernel_size=7)
    return build(DiNAT, arch, kwargs, dilated=True)


@register_model
def dinat_large(**kwargs) -> DiNAT:
    """DiNAT-Large: 200M parameters (ImageNet-22k pre-trained; 86.5% top-1 at 224)."""
    arch = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.0,
                drop_path_rate=0.35, kernel_size=7)
    return build(DiNAT, arch, kwargs, dilated=True)


@register_model
def dinat_large_384(**kwargs) -> DiNAT:
    """DiNAT-Large at 384x384 (dilations for 384: [1, 13, 1], [1, 6, 1, 6], [1, 3]*9, 1s)."""
    arch = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.0,
                drop_path_rate=0.35, kernel_size=7)
    return build(DiNAT, arch, kwargs, dilated=True, img_size=384, crop_pct=1.0)


@register_model
def dinat_s_tiny(**kwargs) -> DiNAT_s:
    """DiNAT_s-Tiny: 28M parameters, 81.8% ImageNet-1k top-1."""
    arch = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4.0,
                drop_path_rate=0.2, kernel_size=7)
    return build(DiNAT_s, arch, kwargs, dilated=True, **_S_CFG)


@register_model
def dinat_s_small(**kwargs) -> DiNAT_s:
    """DiNAT_s-Small: 50M parameters, 83.5% ImageNet-1k top-1."""
    arch = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4.0,
                drop_path_rate=0.3, kernel_size=7)
    return build(DiNAT_s, arch, kwargs, dilated=True, **_S_CFG)


@register_model
def dinat_s_base(**kwargs) -> DiNAT_s:
    """DiNAT_s-Base: 88M parameters, 83.8% ImageNet-1k top-1."""
    arch = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), mlp_ratio=4.0,
                drop_path_rate=0.5, kernel_size=7)
    return build(DiNAT_s, arch, kwargs, dilated=True, **_S_CFG)


@register_model
def dinat_s_large(**kwargs) -> DiNAT_s:
    """DiNAT_s-Large: 197M parameters (ImageNet-22k pre-trained; 86.5% top-1 at 224).

    Heads 6/12/24/48: Swin-L's, and the official segmentation configs' that start from
    this checkpoint. The official classification entrypoint lists 4/8/16/32 instead; a
    checkpoint whose ``rpb`` tensors have those head counts loads with
    ``num_heads=(4, 8, 16, 32)`` (the loader's error names the ``rpb`` keys otherwise).
    """
    arch = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), mlp_ratio=4.0,
                drop_path_rate=0.35, kernel_size=7)
    return build(DiNAT_s, arch, kwargs, dilated=True, **_S_CFG)


@register_model
def dinat_s_large_384(**kwargs) -> DiNAT_s:
    """DiNAT_s-Large at 384x384 (dilations [1, 13], [1, 6], [1, 3]*9, [1, 1])."""
    arch = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), mlp_ratio=4.0,
                drop_path_rate=0.35, kernel_size=7)
    return build(DiNAT_s, arch, kwargs, dilated=True, img_size=384, crop_pct=1.0, **_S_CFG)
