"""``natkit eval``: top-1 / top-5 of a checkpoint on a dataset (also under torchrun)."""

from __future__ import annotations

import argparse
import time

import torch

from . import distributed
from .common import (CLIError, add_preprocess_options, autocast_dtype, check_crop_pct,
                     check_img_size, check_number, check_resize, check_writable, evaluate,
                     info, write_json)
from .data import DataError, make_data
from .loading import load_for_inference, num_outputs, official_preprocess


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="top-1/top-5 accuracy of a natkit or official NAT/DiNAT checkpoint",
        description="Evaluate a checkpoint: a natkit last.pt/best.pt (model, classes and "
                    "preprocessing come from it) or an official NAT/DiNAT .pth (needs --model "
                    "and --data, an ImageFolder whose val/ or root holds the class folders in "
                    "the model's class order, e.g. ImageNet val with synset folders).")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="'digits' or an ImageFolder root (uses ROOT/val if present); "
                                  "default: the dataset the natkit checkpoint was trained on")
    p.add_argument("--model", help="model name: required for official checkpoints; for natkit "
                                   "checkpoints it must match the checkpoint's")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a last.pt")
    p.add_argument("--batch-size", type=int, default=128)
    add_preprocess_options(p)
    p.add_argument("--workers", type=int, help="data-loading processes (min(8, cpus))")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", dest="json_out", help="also write the result to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_number(args.batch_size, "--batch-size", 1)
    check_number(args.workers, "--workers", 0)
    check_img_size(args.img_size)
    check_crop_pct(args.crop_pct)
    if args.json_out is not None:
        check_writable(args.json_out, "--json", folder=False, inputs=[args.checkpoint])
    d = distributed.setup(args.device)
    try:
        return _eval(args, d)
    finally:
        distributed.cleanup()


def _eval(args, d) -> int:
    model, meta = load_for_inference(args.checkpoint, args.model, args.ema, args.img_size)
    data_arg = args.data or meta["data"]
    if data_arg is None:
        raise CLIError("--data is required (an ImageFolder root, or 'digits')")
    pre = meta["preprocess"]
    if pre is None:  # official checkpoint: ImageNet transform on the given folder
        if data_arg == "digits":
            raise DataError("official checkpoints are ImageNet models; pass an ImageFolder "
                            "with --data")
        pre = official_preprocess(model, args.img_size, args.crop_pct)
        check_resize(pre)
    elif args.img_size is not None or args.crop_pct is not None:
        raise CLIError("--img-size/--crop-pct apply to official checkpoints only (a natkit "
                       "checkpoint carries its preprocessing)")
    data = make_data(data_arg, workers=args.workers, need_train=False, preprocess=pre)
    device = d.device
    model.to(device)
    n_out = num_outputs(model, data.in_chans, data.img_size, device)
    if n_out != len(data.classes):
        raise CLIError(f"the model predicts {n_out} classes, the dataset {data_arg!r} has "
                       f"{len(data.classes)} class folders")
    if meta["classes"] is not None and meta["classes"] != data.classes:
        raise CLIError(f"the dataset's class folders differ from the checkpoint's classes "
                       f"(checkpoint: {meta['classes'][:5]}..., data: {data.classes[:5]}...)")
    loader = torch.utils.data.DataLoader(
        data.val, batch_size=args.batch_size, sampler=distributed.ShardSampler(len(data.val), d),
        num_workers=data.loader_workers, pin_memory=device.type == "cuda")
    bar = None
    if args.progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=len(data.val) // d.world, desc="eval", unit="img", leave=False)
    t0 = time.perf_counter()
    res = evaluate(model, loader, device, autocast_dtype(args.amp, device), d, bar)
    if bar is not None:
        bar.close()
    res.update(model=meta["model_name"], checkpoint=args.checkpoint, data=data_arg,
               seconds=time.perf_counter() - t0)
    if d.main:
        info(f"{meta['model_name']} on {data_arg} ({res['count']} images): top-1 "
             f"{res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  "
             f"({res['seconds']:.1f}s)")
        if args.json_out:
            write_json(res, args.json_out, "--json")
    return 0
