"""Model throughput: natkit's NAT-Tiny against timm's Swin-T, in one process.

The issue's setting is the default: batch 128, 224x224, bf16 autocast, on CUDA.

    python benchmarks/bench_models.py                               # GPU, issue setting
    python benchmarks/bench_models.py --device cpu --batch 2 --steps 2 --warmup 1  # smoke

Models: natkit names (``nat_tiny``, ``dinat_tiny``, ...) or ``timm:<name>``; a timm model
is reported as "not measured" when timm cannot be imported. ``--csv`` writes the rows.
"""

from __future__ import annotations

import argparse
import sys

import torch

import natkit
from natkit.bench.models import DTYPES, SWIN_T, format_table, run_models, write_csv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["nat_tiny", SWIN_T])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30, help="timed iterations per mode")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true",
                    help="time every model through torch.compile (compiled in the warmup)")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device; use --device cpu")
    torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# {where}, torch {torch.__version__}, batch {args.batch}, {args.img}x{args.img}, "
          f"{args.dtype} autocast{', torch.compile' if args.compile else ''}, "
          f"{args.steps} timed steps after {args.warmup} warmup; "
          f"natkit backends: {natkit.available_backends()}")
    rows = run_models(args.models, args.device, args.batch, args.img, args.steps,
                      args.warmup, args.dtype, args.compile)
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
