"""Timing and memory helpers: medians of repeated runs, same process for every contender."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def time_ms(fn: Callable[[], object], device: str, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()``; on CUDA via ``triton.testing.do_bench`` (L2 flushed)."""
    if device == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25 * warmup, rep=100 * reps // 10,
                              return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_each_ms(fns: Sequence[Callable[[], object]], device: str, warmup: int = 3,
                 reps: int = 10, errors: tuple = (RuntimeError, ValueError)
                 ) -> list[float | Exception]:
    """Median milliseconds of each ``fn()``, or the error (one of ``errors``) it raised.

    On CUDA each is timed by ``time_ms`` in turn. On the CPU the repetitions are taken
    round-robin (every contender once per round), so a burst of load from elsewhere hits all
    of them alike instead of one contender's block of repetitions."""
    out: list[float | Exception] = []
    if device == "cuda":
        import torch
        for fn in fns:
            try:
                out.append(time_ms(fn, device, warmup, reps))
            except errors as err:
                out.append(err)
                torch.cuda.empty_cache()
        return out
    times: list[list[float] | Exception] = []
    for fn in fns:
        try:
            for _ in range(warmup):
                fn()
            times.append([])
        except errors as err:
            times.append(err)
    for _ in range(reps):
        for i, (fn, t) in enumerate(zip(fns, times)):
            if isinstance(t, list):
                start = time.perf_counter()
                try:
                    fn()
                except errors as err:
                    times[i] = err
                    continue
                t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) if isinstance(t, list) else t for t in times]


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak extra CUDA memory of one ``fn()`` call in MiB (None off CUDA)."""
    if device != "cuda":
        return None
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
