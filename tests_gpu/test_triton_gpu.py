"""Triton backend on a real GPU: the random sweep (float32 vs float64, fp16/bf16 by the
FlashAttention rule, poisoned outputs, both rpb-gradient schemes), autotuning and large
head dims.

Not part of the CPU test suite (the interpreter is far too slow for it); run it on a CUDA
machine with ``python -m pytest tests_gpu -n 8`` (pytest-xdist). Most of the time goes to
compiling kernel variants, so the sweep is split into ``NATKIT_TRITON_SHARDS`` tests (default
8) that xdist runs in parallel processes; without xdist they run one after another.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

import natkit
from natkit._determinism import deterministic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sweep import Config, make_inputs  # noqa: E402
from test_triton import _triton_env, cfg, check  # noqa: E402,F401  (fixture re-exported)

from natkit.backends.triton import configs  # noqa: E402

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA GPU; the CPU suite is `python -m pytest`")


def gpu_config(rng: random.Random) -> Config:
    """Random geometry (runtime kernel arguments vary freely) over a bounded set of compiled
    variants (rank, causal pattern, head_dim, rpb, extra) to keep compile time in check."""
    nd = rng.choice((1, 2, 2, 3))
    max_tokens = {1: 700, 2: 900, 3: 1200}[nd]
    while True:
        kernel = tuple(rng.randint(2, {1: 24, 2: 9, 3: 5}[nd]) for _ in range(nd))
        dil = tuple(rng.choice((1, 1, 1, 2, 3)) for _ in range(nd))
        spatial = tuple(max(k * d + rng.randint(0, 12), 16 if nd < 3 else 8)
                        for k, d in zip(kernel, dil))
        if torch.Size(spatial).numel() <= max_tokens:
            break
    stride = tuple(rng.randint(1, k) if rng.random() < 0.4 else 1 for k in kernel)
    causal = rng.choice([(False,) * nd] * 3 + [(True,) * nd])
    rpb = all(k % 2 for k in kernel) and not any(causal) and rng.random() < 0.5
    kv_heads = rng.choice((1, 2))
    return Config(spatial, kernel, dil, stride, causal, batch=rng.choice((1, 2)),
                  heads=kv_heads * rng.choice((1, 2)), kv_heads=kv_heads,
                  head_dim=rng.choice((16, 24)), rpb=rpb,
                  num_extra=rng.choice((0, 0, 0, 5)))


SWEEP = int(os.environ.get("NATKIT_TRITON_SWEEP", "320"))
SHARDS = int(os.environ.get("NATKIT_TRITON_SHARDS", "8"))


def sweep(seed: int, count: int, dtype, shard: int):
    """Configs ``i`` with ``i % SHARDS == shard`` of one seeded random sequence."""
    rng = random.Random(seed)
    for i in range(count):
        c = gpu_config(rng)
        if i % SHARDS != shard:
            continue
        try:  # with rpb, odd configs take the "separate" rpb-gradient scheme (configs.py),
            # every other one of them in deterministic mode (partial tiles, no atomics)
            with configs.override(drpb="separate" if c.rpb and i % 2 else None), \
                    deterministic(c.rpb and i % 4 == 3):
                check(c, dtype, seed=i)
        except AssertionError as err:
            raise AssertionError(f"config {i}: {c}: {err}") from None


@pytest.mark.parametrize("shard", range(SHARDS))
def test_gpu_sweep_float32(shard):
    sweep(1, SWEEP, torch.float32, shard)


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sweep_half(dtype, shard):
    sweep(2, max(SWEEP // 4, 1), dtype, shard)


def test_gpu_autotuned_and_large_head_dim(monkeypatch):
    """Autotuning picks a config per shape bucket; head dims up to 256 compile and match."""
    monkeypatch.setenv("NATKIT_TRITON_AUTOTUNE", "1")
    check(cfg((20, 24), 7, rpb=True, head_dim=64, batch=2))
    monkeypatch.setenv("NATKIT_TRITON_AUTOTUNE", "0")
    check(cfg((12, 13), 5, head_dim=256))
    check(cfg((300,), 33, head_dim=128, causal=True))


def test_gpu_deterministic_mode_repeats_bit_for_bit():
    """Every gradient, the rpb gradient included, repeats exactly in deterministic mode, on
    a NAT-Tiny stage-1-like shape where the atomics have millions of adds to reorder."""
    c = cfg((56, 56), 7, rpb=True, batch=8, heads=2, kv_heads=2, head_dim=32)
    torch.manual_seed(0)
    inputs = make_inputs(c, torch.bfloat16, "cuda")
    names = [n for n, t in inputs.items() if t is not None]
    runs = []
    with deterministic(True):
        for _ in range(3):
            res = natkit.na2d(inputs["query"], inputs["key"], inputs["value"], 7,
                              rpb=inputs["rpb"], backend="triton")
            runs.append(torch.autograd.grad(res.float().square().sum(),
                                            [inputs[n] for n in names]))
    assert configs.last_drpb_scheme() == "separate"
    for again in runs[1:]:
        for name, a, b in zip(names, runs[0], again):
            assert torch.equal(a, b), name
