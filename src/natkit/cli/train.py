"""``natkit train``: supervised image classification, one process or many (torchrun).

Recipe: AdamW (no weight decay on biases, norms and ``model.no_weight_decay()``), linear
warmup then cosine decay per step, label smoothing, gradient clipping, AMP on GPU
(bf16, or fp16 with a gradient scaler), optional EMA of the weights and mixup/cutmix.

Every epoch rank 0 writes ``OUTPUT/last.pt`` (full training state) and, when the
validation top-1 improves, ``OUTPUT/best.pt`` (weights only), both atomically, and appends
one JSON line to ``OUTPUT/metrics.jsonl``. ``--resume OUTPUT/last.pt`` continues a run:
the random states are restored, so the resumed epochs replay exactly what an
uninterrupted run does (bit for bit on CPU; on GPU with ``--deterministic``, else up to
kernel nondeterminism). The learning-rate schedule is rebuilt from the settings of the
resumed run, placed by completed epochs: another world size or batch size keeps its
place, and a larger ``--epochs`` stretches the cosine over the new total (the rate rises
again: not the same as a run planned that long from the start).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .._determinism import restored, set_deterministic
from . import checkpoint as ckpt_io
from . import distributed
from .common import (CLIError, autocast_dtype, build_model, check_img_size, check_number,
                     check_writable, evaluate, info, make_folder, warn)
from .data import make_data

DEFAULTS = dict(data="digits", model="nat_micro", epochs=40, batch_size=64, lr=5e-3,
                min_lr=1e-5, warmup_epochs=1, weight_decay=0.05, label_smoothing=0.1,
                clip_grad=5.0, drop_path=None, amp="auto", ema=False, ema_decay=0.999,
                mixup=0.0, cutmix=0.0, img_size=None, workers=None, hflip=0.5, seed=0,
                device="auto", output=None, progress=True, compile=False, deterministic=False)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model on the built-in digits or an ImageFolder dataset",
        description="Train a natkit model. Runs as-is on one device, or under "
                    "'torchrun --nproc_per_node N' with DistributedDataParallel "
                    "(--batch-size is per process). Defaults train nat_micro on the built-in "
                    "digits dataset (no download).",
        argument_default=None)
    d = DEFAULTS
    a = p.add_argument
    a("--data", help=f"'digits' (built-in) or an ImageFolder root with train/ and val/ "
                     f"(default: {d['data']})")
    a("--model", help=f"registered model name (default: {d['model']}; on --resume: the "
                      f"checkpoint's)")
    a("--epochs", type=int, help=f"total epochs (default: {d['epochs']})")
    a("--batch-size", type=int, help=f"images per process and step (default: {d['batch_size']})")
    a("--lr", type=float, help=f"peak learning rate (default: {d['lr']})")
    a("--min-lr", type=float, help=f"final learning rate of the cosine (default: {d['min_lr']})")
    a("--warmup-epochs", type=float, help=f"linear warmup (default: {d['warmup_epochs']})")
    a("--weight-decay", type=float, help=f"AdamW weight decay (default: {d['weight_decay']})")
    a("--label-smoothing", type=float, help=f"(default: {d['label_smoothing']})")
    a("--clip-grad", type=float, help=f"max gradient norm, 0 = off (default: {d['clip_grad']})")
    a("--drop-path", type=float, help="stochastic depth rate (default: the model's)")
    a("--amp", choices=["auto", "bf16", "fp16", "none"],
      help="mixed precision: auto = bf16 (or fp16) on GPU, off on CPU (default: auto)")
    a("--ema", action=argparse.BooleanOptionalAction, default=None,
      help="keep an EMA of the weights (default: off; on --resume: the checkpoint's)")
    a("--ema-decay", type=float, help=f"(default: {d['ema_decay']})")
    a("--mixup", type=float, help="mixup alpha, 0 = off (default: 0)")
    a("--cutmix", type=float, help="cutmix alpha, 0 = off (default: 0)")
    a("--img-size", type=int, help="input size (default: from the data)")
    a("--hflip", type=float, help="horizontal-flip probability for ImageFolder data "
                                  f"(default: {d['hflip']})")
    a("--workers", type=int, help="data-loading processes per rank for ImageFolder data "
                                  "(default: min(8, cpus); the digits always load in-process)")
    a("--seed", type=int, help=f"(default: {d['seed']})")
    a("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    a("--output", help="run folder for checkpoints and metrics (default: "
                       "runs/<model>-<data>-<time>; on --resume: the folder of the "
                       "checkpoint resumed, wherever it is now)")
    a("--resume", help="continue from this last.pt (or the run folder holding it)")
    a("--no-progress", dest="progress", action="store_false", default=None,
      help="no progress bars")
    a("--deterministic", action=argparse.BooleanOptionalAction, default=None,
      help="torch.use_deterministic_algorithms(True): GPU runs repeat bit for bit too "
           "(natkit's Triton kernels take their deterministic path: default configs, the "
           "rpb gradient without atomics); slower. CPU runs are deterministic anyway "
           "(default: off; on --resume: the checkpoint's)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the training step's model (inductor: the first steps compile it; "
           "validation runs eagerly); checkpoints are the same as without it (default: off; "
           "on --resume: the checkpoint's)")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- pieces

def resolve_config(args: argparse.Namespace, saved: dict | None) -> dict:
    """Defaults < the resumed checkpoint's settings < options given on this command line."""
    explicit = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    if explicit.get("data", "digits") != "digits":
        explicit["data"] = os.path.abspath(explicit["data"])
    cfg = dict(DEFAULTS)
    if saved is not None:  # not its --output: a resumed run continues where its checkpoint is
        cfg.update({k: v for k, v in saved.items() if k in DEFAULTS and k != "output"})
        changed = {k: v for k, v in explicit.items() if saved.get(k) != v
                   and k not in ("device", "progress", "workers", "output", "compile")}
        if changed:
            warn(f"resuming with changed settings {changed} (the rest come from the checkpoint)")
    cfg.update(explicit)
    for key in ("epochs", "batch_size"):
        check_number(cfg[key], f"--{key.replace('_', '-')}", 1)
    for key in ("lr", "min_lr", "weight_decay", "clip_grad", "mixup", "cutmix",
                "warmup_epochs"):
        check_number(cfg[key], f"--{key.replace('_', '-')}", 0, allow_none=False)
    check_number(cfg["ema_decay"], "--ema-decay", 0, 1, high_open=True)
    check_number(cfg["label_smoothing"], "--label-smoothing", 0, 1, high_open=True)
    check_number(cfg["hflip"], "--hflip", 0, 1)
    check_number(cfg["drop_path"], "--drop-path", 0, 1, high_open=True)
    check_img_size(cfg["img_size"])
    check_number(cfg["workers"], "--workers", 0)
    check_number(cfg["seed"], "--seed", 0, 2 ** 31, high_open=True, allow_none=False)
    if cfg["lr"] > 0 and cfg["min_lr"] > cfg["lr"]:
        raise CLIError(f"--min-lr {cfg['min_lr']} is above the peak --lr {cfg['lr']} (the "
                       f"schedule would rise); lower --min-lr")
    return cfg


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No decay on biases, norm weights (1-D) and the model's ``no_weight_decay()`` names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or name in skip or leaf in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return factor


def schedule(optimizer: torch.optim.Optimizer, cfg: dict, steps_per_epoch: int,
             epochs_done: int) -> torch.optim.lr_scheduler.LambdaLR:
    """This run's settings on the optimizer (``--lr``, ``--weight-decay``: a resumed
    optimizer state carries its old ones) and its warmup + cosine schedule, per step,
    placed after ``epochs_done`` epochs of this run's steps. Placed by epochs, not by a
    saved step count: a resumed run may have another world size or batch size."""
    for group, decay in zip(optimizer.param_groups, (cfg["weight_decay"], 0.0)):
        group["weight_decay"] = decay
        group["initial_lr"] = cfg["lr"]
    total_steps = steps_per_epoch * cfg["epochs"]
    warmup_steps = int(min(cfg["warmup_epochs"] * steps_per_epoch, total_steps))
    min_ratio = cfg["min_lr"] / cfg["lr"] if cfg["lr"] > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps, min_ratio),
        last_epoch=epochs_done * steps_per_epoch - 1)


class EMA:
    """Exponential moving average of a model's parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - self.decay)
            else:
                e.copy_(m)


def mix_batch(x, y, num_classes: int, mixup: float, cutmix: float, smoothing: float):
    """Soft targets with label smoothing; mixup or cutmix (one of them per batch)."""
    off = smoothing / num_classes
    target = torch.full((len(y), num_classes), off, device=x.device)
    target.scatter_(1, y[:, None], 1 - smoothing + off)
    if mixup <= 0 and cutmix <= 0:
        return x, target
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(1) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if use_cutmix:
        h, w = x.shape[-2:]
        rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, (1,))), int(torch.randint(w, (1,)))
        y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, h)
        x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    return x, target * lam + target.flip(0) * (1 - lam)


def _progress(total, desc, enabled):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False,
                file=sys.stderr)


def _kill_step() -> int:
    """Test hook: ``NATKIT_TEST_KILL_AT_STEP=N`` SIGKILLs the process after optimizer step N
    (a hard kill, as a preempted job gets)."""
    return int(os.environ.get("NATKIT_TEST_KILL_AT_STEP", "0"))


# ----------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> int:
    d = distributed.setup(args.device)
    try:
        # --deterministic: the process may go on (tests, notebooks), so the mode is restored
        with restored():
            return _train(args, d)
    finally:
        distributed.cleanup()


def _train(args, d: distributed.Dist) -> int:
    # 1. read and check everything before touching the output folder
    resume_path, saved = None, None
    if args.resume:
        resume_path = args.resume
        if os.path.isdir(resume_path):
            resume_path = os.path.join(resume_path, "last.pt")
        saved = ckpt_io.load_natkit(resume_path, model=args.model, training=True)
    cfg = resolve_config(args, saved["args"] if saved else None)
    if cfg["data"] != "digits":  # checkpoints remember where their data is
        cfg["data"] = os.path.abspath(cfg["data"])
    device = d.device
    set_deterministic(cfg["deterministic"])
    data = make_data(cfg["data"], cfg["img_size"], cfg["workers"], cfg["hflip"])
    if saved is not None:
        if saved["classes"] != data.classes:
            raise CLIError(f"checkpoint {resume_path!r} was trained on classes "
                           f"{saved['classes'][:5]}... ({len(saved['classes'])}), the data "
                           f"has {data.classes[:5]}... ({len(data.classes)})")
        if saved["preprocess"]["in_chans"] != data.in_chans:
            raise CLIError(f"checkpoint {resume_path!r} expects {saved['preprocess']['in_chans']}"
                           f"-channel images, the data has {data.in_chans}")
    model_kwargs = dict(num_classes=len(data.classes), in_chans=data.in_chans,
                        img_size=data.img_size, drop_path_rate=cfg["drop_path"])
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    model = build_model(cfg["model"], **model_kwargs).to(device)
    ema = EMA(model, cfg["ema_decay"]) if cfg["ema"] else None

    if saved is not None:
        ckpt_dir = os.path.dirname(os.path.abspath(resume_path))
        out_dir = cfg["output"] or ckpt_dir
        last = os.path.join(out_dir, "last.pt")
        if os.path.exists(last) and not os.path.samefile(last, resume_path):
            if cfg["output"]:
                raise CLIError(f"--output {out_dir!r} already holds another checkpoint "
                               f"(last.pt); resume into the folder of {resume_path!r} (no "
                               f"--output) or choose another --output")
            raise CLIError(f"{resume_path!r} is not the last.pt of its folder, which a "
                           f"resumed run would overwrite; pass --output for its new folder")
    else:
        ckpt_dir = None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dname = "digits" if cfg["data"] == "digits" else data.name
        out_dir = cfg["output"] or os.path.join("runs", f"{cfg['model']}-{dname}-{stamp}")
        if os.path.exists(os.path.join(out_dir, "last.pt")):
            raise CLIError(f"{out_dir!r} already holds a checkpoint (last.pt); continue it "
                           f"with --resume {os.path.join(out_dir, 'last.pt')} or choose "
                           f"another --output")
    check_writable(out_dir, "--output", folder=True)

    n_train = len(data.train)
    sampler = torch.utils.data.distributed.DistributedSampler(
        data.train, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg["seed"],
        drop_last=True)
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=cfg["batch_size"], sampler=sampler, drop_last=True,
        num_workers=data.loader_workers, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise CLIError(f"--batch-size {cfg['batch_size']} x {d.world} process(es) is larger "
                       f"than the {n_train} training images")
    val_loader = torch.utils.data.DataLoader(
        data.val, batch_size=max(cfg["batch_size"], 64),
        sampler=distributed.ShardSampler(len(data.val), d),
        num_workers=data.loader_workers, pin_memory=device.type == "cuda")

    steps_per_epoch = len(loader)
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["lr"],
                                  betas=(0.9, 0.999))
    amp_dtype = autocast_dtype(cfg["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best = 0, -1.0
    random.seed(cfg["seed"] + d.rank)
    np.random.seed(cfg["seed"] + d.rank)
    torch.manual_seed(cfg["seed"] + d.rank)  # different augmentation per rank
    if saved is not None:
        ckpt_io.load_state(model, saved["model"], resume_path)
        if ema is not None:
            if saved.get("ema") is None:
                raise CLIError(f"checkpoint {resume_path!r} has no EMA weights; resume "
                               f"without --ema")
            ckpt_io.load_state(ema.module, saved["ema"], resume_path, "EMA")
        try:  # the schedule is rebuilt from this run's settings below, not loaded
            optimizer.load_state_dict(saved["optimizer"])
            scaler.load_state_dict(saved["scaler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CLIError(f"checkpoint {resume_path!r}: optimizer state does not "
                           f"fit ({err})") from None
        start_epoch, best = saved["epoch"], saved.get("best_top1", -1.0)
        rngs = saved["rng"]
        if len(rngs) == d.world:
            ckpt_io.set_rng_state(rngs[d.rank])
        else:
            warn(f"checkpoint was written by {len(rngs)} process(es), this run has {d.world}: "
                 f"random states reseeded (the data order stays reproducible)")
            torch.manual_seed(cfg["seed"] + d.rank + 1000 * start_epoch)
        if start_epoch >= cfg["epochs"]:
            info(f"checkpoint {resume_path!r} already finished {start_epoch} of "
                 f"{cfg['epochs']} epochs; pass a larger --epochs to continue")
            return 0
    scheduler = schedule(optimizer, cfg, steps_per_epoch, start_epoch)

    ddp_model = model
    if d.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:  # around DDP, whose buckets then split the graph (DDPOptimizer)
        ddp_model = torch.compile(ddp_model)

    # 2. the run
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if d.main:
        make_folder(out_dir, "--output")
        _carry_history(ckpt_dir, out_dir, start_epoch)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({**cfg, "output": out_dir, "world_size": d.world,
                       "model_kwargs": model_kwargs}, f, indent=1)
        n_params = sum(p.numel() for p in model.parameters())
        info(f"natkit train: {cfg['model']} ({n_params / 1e6:.2f}M params) on {cfg['data']} "
             f"({n_train} train / {len(data.val)} val images, {len(data.classes)} classes, "
             f"{data.in_chans}x{data.img_size}x{data.img_size}); {d.world} process(es) on "
             f"{device.type}, batch {cfg['batch_size']}x{d.world}, amp "
             f"{amp_dtype or 'off'}{', compiled' if cfg['compile'] else ''}; epochs "
             f"{start_epoch + 1}..{cfg['epochs']}; output {out_dir}")
    kill_at = _kill_step()
    show = bool(cfg["progress"]) and d.main
    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg["epochs"]):
        sampler.set_epoch(epoch)
        ddp_model.train()
        bar = _progress(steps_per_epoch * cfg["batch_size"] * d.world,
                        f"epoch {epoch + 1}/{cfg['epochs']}", show)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if data.augment is not None:
                x = data.augment(x)
            x, target = mix_batch(x, y, len(data.classes), cfg["mixup"], cfg["cutmix"],
                                  cfg["label_smoothing"])
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = ddp_model(x)
            loss = F.cross_entropy(logits.float(), target)
            if not torch.isfinite(loss):
                raise CLIError(f"the loss became {loss.item()} at epoch {epoch + 1} step "
                               f"{step + 1}; lower --lr (no checkpoint written for this epoch)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg["clip_grad"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            with torch.no_grad():
                sums += torch.stack([loss.detach().double() * len(y),
                                     (logits.argmax(1) == y).sum().double(),
                                     torch.tensor(float(len(y)), dtype=torch.float64,
                                                  device=device)])
            global_step = epoch * steps_per_epoch + step + 1
            if kill_at and global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if bar is not None:
                bar.update(len(y) * d.world)
                if step % 5 == 0 or step == steps_per_epoch - 1:
                    s = sums.tolist()
                    bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{100 * s[1] / s[2]:.1f}",
                                    img_s=f"{s[2] * d.world / (time.perf_counter() - t0):.0f}",
                                    lr=f"{scheduler.get_last_lr()[0]:.2e}")
        train_time = time.perf_counter() - t0
        loss_sum, correct, count = distributed.all_sum(d, sums.tolist())
        if bar is not None:
            bar.close()
        val = evaluate(model, val_loader, device, amp_dtype, d)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / count,
                  "train_acc": 100 * correct / count, "val_loss": val["loss"],
                  "val_top1": val["top1"], "val_top5": val["top5"],
                  "lr": scheduler.get_last_lr()[0], "img_per_s": count / train_time,
                  "epoch_s": time.perf_counter() - t0}
        score = val["top1"]
        if ema is not None:
            ev = evaluate(ema.module, val_loader, device, amp_dtype, d)
            record.update(ema_val_top1=ev["top1"], ema_val_top5=ev["top5"])
            score = ev["top1"]
        improved = score > best
        best = max(best, score)
        rngs = distributed.all_gather(d, ckpt_io.rng_state())
        if d.main:
            state = {
                ckpt_io.TAG: ckpt_io.FORMAT_VERSION, "model_name": cfg["model"],
                "model_kwargs": model_kwargs, "classes": data.classes,
                "preprocess": data.preprocess, "data": cfg["data"], "model": model.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch + 1, "best_top1": best,
                "rng": rngs, "args": cfg, "metrics": record, "world_size": d.world,
            }
            # last.pt last: a run killed in between resumes from the previous epoch and
            # trims the later metrics lines (best.pt may hold the killed epoch's weights;
            # the replayed epoch rewrites it if it improves, on the CPU always)
            if improved:
                weights = {k: state[k] for k in (ckpt_io.TAG, "model_name", "model_kwargs",
                                                 "classes", "preprocess", "data", "epoch",
                                                 "metrics")}
                weights["model"] = (ema.module if ema is not None else model).state_dict()
                ckpt_io.save_atomic(weights, os.path.join(out_dir, "best.pt"))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            ckpt_io.save_atomic(state, os.path.join(out_dir, "last.pt"))
            ema_txt = (f" ema top-1 {record['ema_val_top1']:.2f}" if ema is not None else "")
            info(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {record['train_loss']:.4f} "
                 f"acc {record['train_acc']:.2f} | val loss {val['loss']:.4f} top-1 "
                 f"{val['top1']:.2f} top-5 {val['top5']:.2f}{ema_txt} | "
                 f"{record['img_per_s']:.0f} img/s, {record['epoch_s']:.1f}s")
        distributed.barrier(d)
    if d.main:
        files = ", ".join(f for f in ("last.pt", "best.pt")
                          if os.path.exists(os.path.join(out_dir, f)))
        info(f"done in {time.perf_counter() - t_run:.1f}s: best val top-1 {best:.2f}; "
             f"checkpoints in {out_dir} ({files}), metrics in {metrics_path}")
    return 0


def _carry_history(ckpt_dir: str | None, out_dir: str, epochs_done: int) -> None:
    """On resume, ``out_dir/metrics.jsonl`` gets the checkpoint folder's lines of the epochs
    the checkpoint includes: lines of later epochs (a killed run) and torn lines (killed
    while writing) are dropped. Into a new folder, ``best.pt`` comes along."""
    if ckpt_dir is None:
        return
    best = os.path.join(ckpt_dir, "best.pt")
    if os.path.exists(best) and not os.path.samefile(ckpt_dir, out_dir):
        shutil.copy2(best, os.path.join(out_dir, "best.pt"))
    src = os.path.join(ckpt_dir, "metrics.jsonl")
    if not os.path.exists(src):
        return
    with open(src) as f:
        lines = [ln for ln in f if (e := _epoch_of(ln)) is not None and e <= epochs_done]
    dst = os.path.join(out_dir, "metrics.jsonl")
    tmp = dst + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, dst)


def _epoch_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None
