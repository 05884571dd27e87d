"""CPU benchmark: natkit's fused CPU backend vs Swin window attention (WSA) vs the portable
backend, fp32, NAT stage shapes, kernel 7, with and without RPB, forward and forward+backward.

Every row is timed in one process; the contenders of a row take turns for ``--rounds``
rounds (so a drifting load on a shared machine hits them alike) and each figure is the
median over rounds of ``natkit.bench.timing.time_ms`` medians. Ratios are to WSA measured
in the same run. Run:
``python benchmarks/bench_cpu.py [--threads N] [--reps R] [--rounds K] [--no-portable] [--csv FILE]``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time

import torch

import natkit
from natkit.backends.cpu import _build
from natkit.bench.baselines import relative_bias_table, window_attention
from natkit.bench.timing import time_ms

SHAPES = [(8, 56, 56, 2, 32), (8, 14, 14, 8, 32)]
KERNEL = 7


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-portable", action="store_true", help="skip the portable (torch) backend")
    ap.add_argument("--csv", default=None, help="write every number to this CSV file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    _build.load()
    print(f"fused CPU kernel ready in {time.perf_counter() - start:.1f} s "
          f"(compile in this process: {_build.compile_seconds:.1f} s; SIMD lanes "
          f"{_build.load().lanes()}); threads {torch.get_num_threads()}")

    rows = []
    for shape in SHAPES:
        b, hgt, wid, heads, dim = shape
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
        rpb_table = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=gen) * 0.1
        for use_rpb in (False, True):
            rpb = rpb_table if use_rpb else None
            bias = relative_bias_table(rpb_table, (KERNEL, KERNEL)) if use_rpb else None
            # correctness of this very call vs the portable backend
            ref = natkit.na2d(q, k, v, KERNEL, rpb=rpb, backend="torch")
            got = natkit.na2d(q, k, v, KERNEL, rpb=rpb, backend="cpu")
            err = (got - ref).abs().max().item()
            assert err < 1e-4, f"cpu backend disagrees with portable: {err}"

            contenders = {
                "wsa": lambda qq, kk, vv: window_attention(qq, kk, vv, (KERNEL, KERNEL), bias),
                "cpu": lambda qq, kk, vv: natkit.na2d(qq, kk, vv, KERNEL, rpb=rpb, backend="cpu"),
            }
            if not args.no_portable:
                contenders["torch"] = lambda qq, kk, vv: natkit.na2d(
                    qq, kk, vv, KERNEL, rpb=rpb, backend="torch")
            for mode in ("fwd", "fwd+bwd"):
                samples = {name: [] for name in contenders}
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                grad = torch.randn(shape, generator=gen)
                for _ in range(args.rounds):
                    for name, fn in contenders.items():
                        if mode == "fwd":
                            with torch.no_grad():
                                samples[name].append(time_ms(lambda: fn(q, k, v), "cpu",
                                                             reps=args.reps))
                        else:
                            def step():
                                fn(*leaves).backward(grad)
                            samples[name].append(time_ms(step, "cpu", reps=args.reps))
                times = {name: statistics.median(v) for name, v in samples.items() if v}
                rows.append(dict(shape="x".join(map(str, shape)), rpb=use_rpb, mode=mode,
                                 **{f"{n}_ms": round(t, 3) for n, t in times.items()},
                                 **{f"{n}/wsa": round(t / times["wsa"], 3)
                                    for n, t in times.items() if n != "wsa"}))
                print(rows[-1], flush=True)

    names = [n for n in ("wsa", "cpu", "torch") if any(f"{n}_ms" in r for r in rows)]
    ratios = [n for n in names if n != "wsa"]
    print()
    print("| shape [B,H,W,heads,dim] | RPB | pass | " + " | ".join(f"{n} ms" for n in names)
          + " | " + " | ".join(f"{n} / WSA" for n in ratios) + " | cpu target |")
    print("|---|---|---|" + "---|" * (len(names) + len(ratios)) + "---|")
    for r in rows:
        target = "1.5" if r["mode"] == "fwd" else "2.0"
        print(f"| {r['shape']} | {'yes' if r['rpb'] else 'no'} | {r['mode']} | "
              + " | ".join(f"{r[f'{n}_ms']:.2f}" for n in names) + " | "
              + " | ".join(f"{r[f'{n}/wsa']:.2f}" for n in ratios) + f" | ≤ {target} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            fields = list(dict.fromkeys(key for r in rows for key in r))
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
