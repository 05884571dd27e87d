"""``NeighborhoodAttention1D/2D/3D``: qkv projection, neighborhood attention, output projection.

Parameter names (``qkv``, ``rpb``, ``proj``) match the official NAT/DiNAT checkpoints.
Inputs are channels-last ``[batch, *spatial, dim]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import _tuple, check_inputs, check_scale, is_int, is_real
from .backends import require_portable
from .backends.portable import na_portable
from .functional import neighborhood_attention


def _pad_spatial(x: torch.Tensor, pads: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    """Pads the spatial dims of ``[B, *spatial, H, D]`` at their end (right/bottom/back)."""
    widths = []
    for pad in reversed(pads):  # F.pad lists the last dim first; skip H and D
        widths += [0, pad]
    return F.pad(x, [0, 0, 0, 0] + widths, value=value)


ATTN_DROP_REASON = ("attention dropout (attn_drop > 0 in training) needs the attention "
                    "probabilities, which only the portable backend ('torch') forms")


class _NeighborhoodAttention(nn.Module):
    ndim: int

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, stride=1,
                 is_causal=False, rel_pos_bias: bool = False, qkv_bias: bool = True,
                 qk_scale=None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        nd = self.ndim
        if not is_int(dim) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not is_int(num_heads) or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing dim={dim}, "
                             f"got {num_heads!r}")
        for name, flag in (("rel_pos_bias", rel_pos_bias), ("qkv_bias", qkv_bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        for name, rate in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not is_real(rate) or not 0 <= rate < 1:
                raise ValueError(f"{name} must be a probability in [0, 1), got {rate!r}")
        if qk_scale is not None and not (is_real(qk_scale) and math.isfinite(qk_scale)):
            raise ValueError(f"qk_scale must be a finite real number or None, got {qk_scale!r}")
        self.kernel_size = _tuple("kernel_size", kernel_size, nd, int)
        self.dilation = _tuple("dilation", dilation, nd, int)
        self.stride = _tuple("stride", stride, nd, int)
        self.is_causal = _tuple("is_causal", is_causal, nd, bool)
        if any(k < 2 for k in self.kernel_size):
            raise ValueError(f"kernel_size must be >= 2, got {kernel_size!r}")
        if any(d < 1 for d in self.dilation):
            raise ValueError(f"dilation must be >= 1, got {dilation!r}")
        if any(not 1 <= s <= k for s, k in zip(self.stride, self.kernel_size)):
            raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size, got {stride!r}")
        if rel_pos_bias and (any(k % 2 == 0 for k in self.kernel_size) or any(self.is_causal)):
            raise ValueError(f"rel_pos_bias needs odd kernel sizes and no causal masking, got "
                             f"kernel_size={kernel_size!r}, is_causal={is_causal!r}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = self.ndim
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != nd + 2 or x.shape[-1] != self.dim:
            raise ValueError(f"input must be [batch, *spatial({nd} dims), dim={self.dim}], got "
                             f"shape {tuple(x.shape)}")
        weight = self.qkv.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"input dtype {x.dtype} differs from the module's {weight.dtype}")
        if x.device != weight.device:
            raise ValueError(f"input is on {x.device}, the module on {weight.device}")
        batch, *spatial, _ = x.shape
        if 0 in spatial:  # no tokens to attend: an empty output of the right shape, and
            # zero gradients for every parameter (as DistributedDataParallel expects)
            zero = self.qkv(x).sum() * 0 + (0 if self.rpb is None else self.rpb.sum() * 0)
            return self.proj_drop(self.proj(x)) + zero
        # reshape, not unflatten: the TorchScript ONNX exporter fixes unflatten's batch size
        qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(-3)  # strided views: no copy
        pads = tuple(max(kk * d - s, 0) for kk, d, s in zip(self.kernel_size, self.dilation,
                                                             spatial))
        scale = self.scale
        if any(pads):  # checked here: the op sees only the pre-scaled q
            q, k, v = _masked_padding(q * check_scale(scale, q.dtype), k, v, pads)
            scale = 1.0
        args = dict(kernel_size=self.kernel_size, dilation=self.dilation, stride=self.stride,
                    is_causal=self.is_causal, rpb=self.rpb, scale=scale)
        if self.training and self.attn_drop > 0 and batch > 0:
            require_portable(ATTN_DROP_REASON)
            p = check_inputs(nd, q, k, v, args["kernel_size"], args["dilation"], args["stride"],
                             args["is_causal"], self.rpb, scale, None, None)
            out, _ = na_portable(q, k, v, p, self.rpb, dropout_p=self.attn_drop)
        else:
            out = neighborhood_attention(q, k, v, **args)
        if any(pads):
            out = out[(slice(None), *(slice(0, s) for s in spatial))][..., :self.head_dim]
        out = out.reshape(batch, *spatial, self.dim)
        return self.proj_drop(self.proj(out))


def _masked_padding(q, k, v, pads):
    """Pads q/k/v so every spatial size reaches ``kernel * dilation`` and masks padded keys.

    ``q`` comes pre-scaled (the op then runs with scale 1), so the mask does not depend on
    the sign or size of ``qk_scale``. It rides on one extra channel: queries carry ``c``
    there, real keys 0 and padded keys ``-c``, so a padded key's logit is ``real - c**2``
    and its probability underflows to exactly 0 on every backend, without a mask argument
    in the op: ``c**2`` is 1e30 (float32/float64/bfloat16 hold it) or 2**30 in float16,
    beyond any logit float16 inputs reach in practice. Values get a zero channel, cropped
    by the caller along with the padded queries.
    """
    c = 2.0 ** 15 if q.dtype == torch.float16 else 1e15
    ones = q.new_ones(q.shape[:-1] + (1,))
    q = _pad_spatial(torch.cat([q, ones * c], -1), pads)
    k = torch.cat([_pad_spatial(k, pads), _pad_spatial(ones * 0, pads, value=-c)], -1)
    v = _pad_spatial(torch.cat([v, ones * 0], -1), pads)
    return q, k, v


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention module over ``[batch, length, dim]``."""
    ndim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention module over ``[batch, height, width, dim]``."""
    ndim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention module over ``[batch, depth, height, width, dim]``."""
    ndim = 3
