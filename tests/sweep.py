"""Random neighborhood-attention configurations shared by the backend test files."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

# Size of the random sweeps: NATKIT_SWEEP=500 for a thorough local run; CI uses the default.
SWEEP = int(os.environ.get("NATKIT_SWEEP", "200"))


@dataclass
class Config:
    spatial: tuple
    kernel_size: tuple
    dilation: tuple
    stride: tuple
    is_causal: tuple
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    rpb: bool
    num_extra: int

    def kwargs(self) -> dict:
        return dict(kernel_size=self.kernel_size, dilation=self.dilation, stride=self.stride,
                    is_causal=self.is_causal)


def random_config(rng: random.Random, nd: int | None = None, max_tokens: int = 400,
                  wide: bool = False) -> Config:
    """A random valid configuration: odd/even kernels, dilation, stride, causal, RPB, extra KV,
    GQA, sizes that are not multiples of anything in particular. ``wide`` (the CPU kernel's
    sweep) also draws long last dimensions that straddle SIMD widths, 1-D kernels up to 9,
    head dims 13 and 32, up to 3 query heads per kv head and up to 9 extra tokens."""
    nd = nd or rng.choice((1, 2, 3))
    while True:
        kernel = tuple(rng.randint(2, (9 if wide else 7) if nd == 1 else 5) for _ in range(nd))
        dil = tuple(rng.choice((1, 1, 2, 3)) for _ in range(nd))
        spatial = tuple(k * d + rng.randint(0, 23 if wide and i == nd - 1 else 6)
                        for i, (k, d) in enumerate(zip(kernel, dil)))
        if torch.Size(spatial).numel() <= max_tokens:
            break
    stride = tuple(rng.randint(1, k) if rng.random() < 0.5 else 1 for k in kernel)
    causal = tuple(rng.random() < 0.3 for _ in range(nd))
    rpb = all(k % 2 for k in kernel) and not any(causal) and rng.random() < 0.5
    kv_heads = rng.choice((1, 2))
    return Config(spatial, kernel, dil, stride, causal, batch=rng.choice((1, 2)),
                  heads=kv_heads * rng.choice((1, 2, 3) if wide else (1, 2)), kv_heads=kv_heads,
                  head_dim=rng.choice((4, 8, 13, 32) if wide else (4, 8, 12)), rpb=rpb,
                  num_extra=rng.choice((0, 0, 1, 3, 9) if wide else (0, 0, 1, 3)))


def make_inputs(cfg: Config, dtype=torch.float64, device="cpu", requires_grad=True,
                generator: torch.Generator | None = None) -> dict:
    """Random leaf tensors for ``cfg``: query, key, value, rpb, additional_keys/values (drawn
    from ``generator``, a CPU generator, if given)."""
    def t(*shape, scale=1.0):
        x = torch.randn(*shape, dtype=torch.float64, generator=generator) * scale
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    b, h, hk, d = cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim
    out = dict(query=t(b, *cfg.spatial, h, d), key=t(b, *cfg.spatial, hk, d),
               value=t(b, *cfg.spatial, hk, d), rpb=None, additional_keys=None,
               additional_values=None)
    if cfg.rpb:
        out["rpb"] = t(h, *(2 * k - 1 for k in cfg.kernel_size), scale=0.5)
    if cfg.num_extra:
        out["additional_keys"] = t(b, cfg.num_extra, hk, d)
        out["additional_values"] = t(b, cfg.num_extra, hk, d)
    return out


def grads(out: torch.Tensor, lse: torch.Tensor, inputs: dict, grad_out: torch.Tensor,
          grad_lse: torch.Tensor | None = None) -> dict:
    """Gradients of ``<out, grad_out> (+ <lse, grad_lse>)`` w.r.t. every tensor input."""
    names = [n for n, v in inputs.items() if v is not None and v.requires_grad]
    loss = (out.double() * grad_out).sum()
    if grad_lse is not None:
        loss = loss + (lse.double() * grad_lse).sum()
    got = torch.autograd.grad(loss, [inputs[n] for n in names])
    return dict(zip(names, got))


def assert_fa_close(name: str, got: torch.Tensor, ref: torch.Tensor, low: torch.Tensor,
                    dtype: torch.dtype, rel_floor: float = 0.0, abs_floor: float = 1e-5) -> None:
    """FlashAttention's tolerance rule: ``|got - ref| <= 2 |low - ref| + floor``.

    ``ref`` is the float64 result, ``low`` the reference computed in ``dtype``; the floor
    is twice the rounding error of storing ``ref`` in ``dtype``, plus ``abs_floor``, plus
    ``rel_floor`` times the magnitude of ``ref`` (for kernels that sum in another order).
    """
    ref = ref.double()
    floor = (2 * (ref.to(dtype).double() - ref).abs().max() + abs_floor
             + rel_floor * (1 + ref.abs().max()))
    err = (got.double() - ref).abs().max()
    bound = 2 * (low.double() - ref).abs().max() + floor
    assert err <= bound, f"{name}: error {float(err):.3g} > bound {float(bound):.3g}"


def params(cfg: Config, inputs: dict):
    """The validated ``NAParams`` of ``cfg`` called on ``inputs``, as the public op builds them."""
    from natkit._checks import check_inputs
    return check_inputs(len(cfg.spatial), inputs["query"], inputs["key"], inputs["value"],
                        cfg.kernel_size, cfg.dilation, cfg.stride, cfg.is_causal, inputs["rpb"],
                        None, inputs["additional_keys"], inputs["additional_values"])


def reference_pairs(p) -> int:
    """(query, key) pairs per batch element and head on the reference's dense mask, plus the
    extra tokens every query attends."""
    from natkit.backends.reference import dense_mask
    return int(dense_mask(p).sum()) + p.num_tokens * p.num_extra


def counted_flops(cfg: Config, backend: str, device="cpu") -> tuple[int, int, int, int]:
    """``(forward, backward)`` FLOPs that ``FlopCounterMode`` counts for one call of
    ``backend`` on ``cfg`` (float32) and the ``(forward, backward)`` that the pairs of the
    reference's dense mask give (``4`` and ``10`` FLOPs per pair and head dim)."""
    from torch.utils.flop_counter import FlopCounterMode

    import natkit

    d = make_inputs(cfg, torch.float32, device)
    with FlopCounterMode(display=False) as counter:
        out = natkit.neighborhood_attention(
            d["query"], d["key"], d["value"], **cfg.kwargs(), rpb=d["rpb"],
            additional_keys=d["additional_keys"], additional_values=d["additional_values"],
            backend=backend)
        forward = counter.get_total_flops()
        out.sum().backward()
    backward = counter.get_total_flops() - forward
    per_pair = cfg.batch * cfg.heads * cfg.head_dim * reference_pairs(params(cfg, d))
    return forward, backward, 4 * per_pair, 10 * per_pair
