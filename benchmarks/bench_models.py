"""Model throughput: natkit's NAT-Tiny against timm's Swin-T, in one process.

Measures images/s of inference (``torch.inference_mode``) and of a full training step
(forward, cross-entropy, backward, AdamW step) under autocast, for each model, with the
same inputs, batch size and settings. The issue's setting is the default: batch 128,
224x224, bf16 autocast, on CUDA.

    python benchmarks/bench_models.py                               # GPU, issue setting
    python benchmarks/bench_models.py --device cpu --batch 2 --steps 2 --warmup 1  # smoke

Models: natkit names (``nat_tiny``, ``dinat_tiny``, ...) or ``timm:<name>`` (default
Swin-T: ``timm:swin_tiny_patch4_window7_224``). A timm model is reported as "not
measured" when timm cannot be imported. ``--csv`` writes the rows to a file.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time

import torch
import torch.nn.functional as F

import natkit
from natkit.models import create_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(name: str, device: str, img: int):
    """Returns ``(model, note)``; ``model`` is None when it cannot be built here."""
    if name.startswith("timm:"):
        try:
            import timm
        except Exception as err:   # absent, or unusable (e.g. no torchvision)
            return None, f"not measured: timm not importable ({type(err).__name__}: {err})"
        return timm.create_model(name[5:], img_size=img).to(device), f"timm {timm.__version__}"
    return create_model(name, img_size=img).to(device), f"natkit {natkit.__version__}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def images_per_s(step, batch: int, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def measure(model, args, x, y):
    amp = dict(device_type=args.device, dtype=DTYPES[args.dtype],
               enabled=args.dtype != "fp32")

    model.eval()

    def infer():
        with torch.inference_mode(), torch.autocast(**amp):
            model(x)

    inf = images_per_s(infer, args.batch, args.steps, args.warmup, args.device)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(args.device, enabled=args.dtype == "fp16")

    def train():
        with torch.autocast(**amp):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tr = images_per_s(train, args.batch, args.steps, args.warmup, args.device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    return inf, tr, mem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+",
                    default=["nat_tiny", "timm:swin_tiny_patch4_window7_224"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30, help="timed iterations per mode")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device; use --device cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)

    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# {where}, torch {torch.__version__}, batch {args.batch}, {args.img}x{args.img}, "
          f"{args.dtype} autocast, {args.steps} timed steps after {args.warmup} warmup; "
          f"natkit backends: {natkit.available_backends()}")
    rows = []
    for name in args.models:
        model, note = build(name, args.device, args.img)
        if model is None:
            rows.append(dict(model=name, params_m="", infer_img_s="", train_img_s="",
                             peak_train_gib="", note=note))
            continue
        params = sum(p.numel() for p in model.parameters()) / 1e6
        chans = model.pretrained_cfg["input_size"][0]
        x = torch.randn(args.batch, chans, args.img, args.img, device=args.device)
        y = torch.randint(0, model.num_classes, (args.batch,), device=args.device)
        inf, tr, mem = measure(model, args, x, y)
        rows.append(dict(model=name, params_m=f"{params:.1f}", infer_img_s=f"{inf:.1f}",
                         train_img_s=f"{tr:.1f}",
                         peak_train_gib="" if mem is None else f"{mem:.2f}", note=note))
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()

    base = next((r for r in rows if r["model"].startswith("timm:") and r["infer_img_s"]), None)
    print("| model | params (M) | inference img/s | train step img/s | peak train mem (GiB) "
          "| vs baseline (inf / train) | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = ""
        if base is not None and r["infer_img_s"]:
            ratio = (f"{float(r['infer_img_s']) / float(base['infer_img_s']):.2f}x / "
                     f"{float(r['train_img_s']) / float(base['train_img_s']):.2f}x")
        print(f"| {r['model']} | {r['params_m']} | {r['infer_img_s']} | {r['train_img_s']} | "
              f"{r['peak_train_gib']} | {ratio} | {r['note']} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
