"""Where the Triton kernels' time can go, measured without a GPU.

For every shape of ``bench_gpu.py`` (BENCH.md), every kernel (forward, dQ, dK/dV) and every
tile config the autotuner may pick, prints:

- tile work (``natkit.backends.triton.work``): scores computed per attended pair (tile
  waste) and the share of them that pays for the window mask, counted exactly as the
  kernels iterate (with RPB also the dQ kernel without its atomics, ``dq-``, and the dRPB
  kernel: the "separate" rpb-gradient scheme of ``configs.py``);
- sm_90 resources (``natkit.backends.triton.aot``, compiled with the launch arguments of
  that very shape): registers per thread, spill bytes, whether the loop's loads are
  software-pipelined, shared memory, and the occupancy that follows (programs and warps
  resident per SM), from ptxas on the PTX Triton emits for an H100;
- an issue-bound time (``aot.issue_bound_ms``): SASS instructions of the tile loop times the
  tile pairs visited, over 132 SMs x 4 schedulers at 1.755 GHz. A lower bound, not a
  prediction: it ignores memory, the matrix and exp units' limits and load imbalance;
- a tensor-core bound (``aot.mma_bound_ms``): the matrix products of every visited tile pair at
  the dense peak. A kernel takes at least the larger of the two ("bound").

Runs on a CPU machine (Triton's wheel carries ptxas); writes every row to a CSV.

    PYTHONPATH=src python benchmarks/triton_static.py --csv triton_static.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from bench_gpu import SHAPES  # noqa: E402

from natkit.backends.triton import aot, configs  # noqa: E402
from natkit.backends.triton.work import tile_work  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default="triton_static.csv")
    ap.add_argument("--only", default="", help="comma-separated substrings of shape names")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    fields = ["shape", "rpb", "kind", "config", "default", "waste", "masked_pct", "programs",
              "registers", "spill_bytes", "pipelined", "shared_kb", "ctas_per_sm",
              "warps_per_sm", "loop_instructions", "issue_bound_ms", "mma_bound_ms",
              "bound_ms"]
    with open(args.csv, "w", newline="") as raw:
        writer = csv.DictWriter(raw, fieldnames=fields)
        writer.writeheader()
        for name, b, spatial, h, d, kernel, passes, rpbs in SHAPES:
            if only and not any(o in name for o in only):
                continue
            nd = len(spatial)
            groups = (1,) * (3 - nd) + tuple(spatial)
            ones = (1,) * nd
            print(f"== {name}: B={b} spatial={spatial} heads={h} dim={d} kernel={kernel}")
            for rpb in rpbs:
                # (kernel, rpb-gradient scheme); with rpb the "separate" scheme runs the dQ
                # kernel without its atomics ("dq-") and the dRPB kernel
                kinds = [("fwd", "fused")]
                if "fwd+bwd" in passes:
                    kinds += [("dq", "fused"), ("dkdv", "fused")]
                    if rpb:
                        kinds += [("dq", "separate"), ("drpb", "separate")]
                for kind, scheme in kinds:
                    label = "dq-" if (kind, scheme) == ("dq", "separate") else kind
                    cands = configs.candidates(nd, configs.block_d(d), groups, kind, rpb,
                                               dtype=torch.bfloat16)
                    for i, cfg in enumerate(cands):
                        work = tile_work(spatial, kernel, ones, ones, (False,) * nd, cfg,
                                         kind, batch_heads=b * h)
                        res = aot.resources(kind, cfg, aot.Problem(
                            spatial, kernel, batch=b, heads=h, head_dim=d, rpb=rpb,
                            drpb_scheme=scheme))
                        visits = work.computed // (cfg.block_m * cfg.block_n)
                        issue = aot.issue_bound_ms(res, visits)
                        mma = aot.mma_bound_ms(kind, cfg, configs.block_d(d), visits)
                        row = dict(shape=name, rpb=int(rpb), kind=label,
                                   config=f"q{'x'.join(map(str, cfg.q_tile))} "
                                          f"k{'x'.join(map(str, cfg.k_tile))} "
                                          f"w{cfg.num_warps} s{cfg.num_stages}",
                                   default=int(i == 0), waste=round(work.waste, 2),
                                   masked_pct=round(100 * work.masked_fraction, 1),
                                   programs=work.programs, registers=res.registers,
                                   spill_bytes=res.spill_bytes, pipelined=int(res.pipelined),
                                   shared_kb=round(res.shared / 1024, 1),
                                   ctas_per_sm=res.ctas_per_sm, warps_per_sm=res.warps_per_sm,
                                   loop_instructions=res.loop_instructions,
                                   issue_bound_ms=round(issue, 4),
                                   mma_bound_ms=round(mma, 4),
                                   bound_ms=round(max(issue, mma), 4))
                        writer.writerow(row)
                        print(f"  rpb={int(rpb)} {label:4s} {row['config']:22s}"
                              f"{'*' if i == 0 else ' '} waste {row['waste']:5.2f}  "
                              f"masked {row['masked_pct']:5.1f}%  regs {res.registers:3d}  "
                              f"spill {row['spill_bytes']:5d} B  {'pipelined' if res.pipelined else 'sync load'}  smem {row['shared_kb']:5.1f} KB  "
                              f"{res.ctas_per_sm:2d} programs / {res.warps_per_sm:2d} warps per SM  "
                              f"issue {issue:.3f} / tensor cores {mma:.3f} ms",
                              flush=True)
    print(f"(* = default when not autotuning; CSV: {args.csv})")


if __name__ == "__main__":
    main()
