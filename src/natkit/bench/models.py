"""Model throughput: natkit models against timm's Swin-T, in one process.

Images/s of inference (``torch.inference_mode``) and of a full training step (forward,
cross-entropy, backward, AdamW step) under autocast, for each model, with the same inputs,
batch size and settings. Used by ``benchmarks/bench_models.py`` and ``natkit bench --models``.
Model names are natkit names (``nat_tiny``, ...) or ``timm:<name>``.
"""

from __future__ import annotations

import csv
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import natkit

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SWIN_T = "timm:swin_tiny_patch4_window7_224"


def build(name: str, device: str, img: int):
    """Returns ``(model, note)``; ``model`` is None when it cannot be built here."""
    if name.startswith("timm:"):
        try:
            import timm
        except Exception as err:   # absent, or unusable (e.g. no torchvision)
            return None, f"not measured: timm not importable ({type(err).__name__}: {err})"
        return timm.create_model(name[5:], img_size=img).to(device), f"timm {timm.__version__}"
    from natkit.models import create_model
    return create_model(name, img_size=img).to(device), f"natkit {natkit.__version__}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def images_per_s(step, batch: int, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def measure(model, x, y, device: str, dtype: str, steps: int, warmup: int,
            compile: bool = False):
    """``(inference img/s, train-step img/s, peak train GiB or None)`` of one model;
    ``compile``: through ``torch.compile`` (each mode compiles in its first warmup step)."""
    amp = dict(device_type=device, dtype=DTYPES[dtype], enabled=dtype != "fp32")
    batch = x.shape[0]
    run = torch.compile(model) if compile else model
    model.eval()

    def infer():
        with torch.inference_mode(), torch.autocast(**amp):
            run(x)

    inf = images_per_s(infer, batch, steps, warmup, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device, enabled=dtype == "fp16")

    def train():
        with torch.autocast(**amp):
            loss = F.cross_entropy(run(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tr = images_per_s(train, batch, steps, warmup, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return inf, tr, mem


def run_models(names: Sequence[str], device: str, batch: int, img: int = 224,
               steps: int = 30, warmup: int = 10, dtype: str = "bf16",
               compile: bool = False) -> list[dict]:
    """One row per model: params_m, infer_img_s, train_img_s, peak_train_gib, note;
    ``compile``: every model through ``torch.compile`` (noted in the row)."""
    if warmup < 1 and compile:
        raise ValueError(f"warmup must be >= 1 with compile (the first step compiles), "
                         f"got {warmup}")
    torch.manual_seed(0)
    rows = []
    for name in names:
        model, note = build(name, device, img)
        row = dict(model=name, params_m=None, infer_img_s=None, train_img_s=None,
                   peak_train_gib=None, note=note)
        rows.append(row)
        if model is None:
            continue
        if compile:
            row["note"] += ", torch.compile"
        chans = model.pretrained_cfg["input_size"][0]
        x = torch.randn(batch, chans, img, img, device=device)
        y = torch.randint(0, model.num_classes, (batch,), device=device)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        row["infer_img_s"], row["train_img_s"], row["peak_train_gib"] = measure(
            model, x, y, device, dtype, steps, warmup, compile)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict], baseline: Optional[str] = None) -> str:
    """Markdown table; ratios against ``baseline`` (default: the first timm model measured)."""
    base = next((r for r in rows if r["infer_img_s"] and (
        r["model"] == baseline if baseline else r["model"].startswith("timm:"))), None)
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = ["| model | params (M) | inference img/s | train step img/s | peak train mem (GiB) "
             "| vs baseline (inf / train) | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = ""
        if base is not None and r["infer_img_s"]:
            ratio = (f"{r['infer_img_s'] / base['infer_img_s']:.2f}x / "
                     f"{r['train_img_s'] / base['train_img_s']:.2f}x")
        lines.append(f"| {r['model']} | {fmt(r['params_m'], '.1f')} | "
                     f"{fmt(r['infer_img_s'], '.1f')} | {fmt(r['train_img_s'], '.1f')} | "
                     f"{fmt(r['peak_train_gib'], '.2f')} | {ratio} | {r['note']} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
