"""The neighborhood-attention benchmark behind ``natkit bench``.

For each case (a named preset or a custom shape) it times, in one process on the same
inputs: every natkit backend that can run the case, Swin window self-attention (WSA,
``bench.baselines.window_attention``: the baseline of the ratios), full attention
(``baselines.full_attention``) and, on CUDA, FlexAttention with a neighborhood mask
(``natkit.bench.flex`` when present, else the mask below). Forward and forward+backward,
median milliseconds (``timing.time_each_ms``: round-robin on the CPU) and peak extra CUDA
memory.

``run_models`` times NAT models against timm's Swin-T (inference and a training step).
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from .._checks import NAParams
from .._flops import na_flops
from . import baselines
from .timing import peak_memory_mb, time_each_ms


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    kernel: tuple[int, ...]
    dilation: tuple[int, ...] = ()
    fwd_only: bool = False  # large shapes: BENCH.md measures the forward only

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel))
        dil = ("" if all(x == 1 for x in self.dilation)
               else " dil" + "x".join(map(str, self.dilation)))
        return (f"{self.batch}x{'x'.join(map(str, self.spatial))} h{self.heads} d{self.head_dim}"
                f" k{k}{dil}")


# NAT-Tiny stage shapes: batch 64 on GPU, 8 on CPU (../shared/BENCH.md); None = by device
PRESETS: dict[str, dict] = {
    "nat-s1": dict(batch=None, spatial=(56, 56), heads=2, head_dim=32, kernel=7),
    "nat-s3": dict(batch=None, spatial=(14, 14), heads=8, head_dim=32, kernel=7),
    "2d-128-k13": dict(batch=1, spatial=(128, 128), heads=8, head_dim=128, kernel=13),
    "2d-256-k31": dict(batch=1, spatial=(256, 256), heads=8, head_dim=128, kernel=31),
    "1d-32k-k2048": dict(batch=1, spatial=(32768,), heads=24, head_dim=128, kernel=2048,
                         fwd_only=True),
    "flux-2d": dict(batch=1, spatial=(256, 256), heads=24, head_dim=128, kernel=80,
                    fwd_only=True),
    "video-3d": dict(batch=1, spatial=(30, 48, 80), heads=24, head_dim=128,
                     kernel=(18, 24, 24), fwd_only=True),
    # seconds on a CPU: for tests and smoke runs
    "tiny": dict(batch=2, spatial=(12, 12), heads=2, head_dim=16, kernel=3),
}
GROUPS = {"nat": ["nat-s1", "nat-s3"],
          "large": ["2d-128-k13", "2d-256-k31", "1d-32k-k2048", "flux-2d", "video-3d"]}
GROUPS["all"] = GROUPS["nat"] + GROUPS["large"]

BASELINE = "swin-wsa"
# full attention on CPU beyond this many tokens takes minutes per call
CPU_FULL_MAX_TOKENS = 16384


def preset_case(name: str, device: str, batch: Optional[int] = None) -> Case:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}, groups: "
                         f"{sorted(GROUPS)}")
    cfg = dict(PRESETS[name])
    nd = len(cfg["spatial"])
    if batch is not None:
        cfg["batch"] = batch
    elif cfg["batch"] is None:
        cfg["batch"] = 64 if device == "cuda" else 8
    kernel = cfg["kernel"]
    cfg["kernel"] = tuple(kernel) if isinstance(kernel, tuple) else (kernel,) * nd
    return Case(name=name, **cfg)


def expand_presets(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        for m in GROUPS.get(n, [n]):
            if m not in out:
                out.append(m)
    return out


@dataclass
class Result:
    case: str
    shape: str
    mode: str            # "fwd" or "fwd+bwd"
    contender: str
    rpb: bool
    ms: Optional[float] = None
    peak_mb: Optional[float] = None
    ratio_to_wsa: Optional[float] = None
    speedup_over_full: Optional[float] = None
    tflops: Optional[float] = None
    note: str = ""


# ----------------------------------------------------------------------------- contenders

def _flex(case: Case, device: str, rpb):
    """FlexAttention NA on CUDA: ``(fn, prep)``, ``prep`` puts heads-last inputs into the
    layout ``fn`` takes (not timed). Uses ``natkit.bench.flex.FlexNA`` (tile-major tokens,
    RPB as a score_mod) when present, else a plain row-major neighborhood mask."""
    try:
        from .flex import FlexNA
    except ImportError:
        FlexNA = None
    if FlexNA is not None:
        flex = FlexNA(case.spatial, case.kernel, case.dilation or None, rpb=rpb, device=device)
        return flex, flex.to_tiled
    if rpb is not None:
        return None, None
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    spatial, kernel = case.spatial, case.kernel
    dil = case.dilation or (1,) * len(spatial)

    def coords(idx):
        out = []
        for size in reversed(spatial):
            out.append(idx % size)
            idx = idx // size
        return out[::-1]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx >= 0
        for i, j, length, k, d in zip(coords(q_idx), coords(kv_idx), spatial, kernel, dil):
            g = i % d
            glen = (length - g + d - 1) // d
            start = torch.clamp(torch.minimum(i // d - k // 2, glen - k), min=0)
            jj = j // d
            ok = ok & (j % d == g) & (jj >= start) & (jj < start + k)
        return ok

    n = case.tokens
    block = create_block_mask(mask_mod, None, None, n, n, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def prep(x):
        b, *_, h, d = x.shape
        return x.reshape(b, n, h, d).transpose(1, 2).contiguous()
    return (lambda q, k, v: compiled(q, k, v, block_mask=block)), prep


def contenders(case: Case, device: str, q, rpb, requires_grad: bool, include: Optional[set],
               flex: bool = True):
    """``[(name, fn or None, note, prep)]``: fn(q, k, v) -> out; None = skipped (note says
    why); ``prep`` (or None) converts heads-last inputs to fn's layout, untimed."""
    from natkit import available_backends, neighborhood_attention
    from natkit._checks import check_inputs
    from natkit.backends import backends
    out = []
    dil = case.dilation or 1
    p = check_inputs(len(case.spatial), q, q, q, case.kernel, dil, 1, False, rpb, None, None,
                     None)
    for name in available_backends():
        if name == "reference":  # dense N x N mask: an oracle, not a contender
            continue
        reason = backends()[name].can_run(p, q, rpb, requires_grad)
        fn = None if reason else (lambda q_, k_, v_, _n=name: neighborhood_attention(
            q_, k_, v_, case.kernel, dilation=dil, rpb=rpb, backend=_n))
        out.append((f"natkit-{name}", fn, reason or "", None))
    if case.dilation and any(d > 1 for d in case.dilation):
        out.append((BASELINE, None, "window attention has no dilation", None))
    else:
        bias = baselines.relative_bias_table(rpb, case.kernel) if rpb is not None else None
        out.append((BASELINE, lambda q_, k_, v_: baselines.window_attention(
            q_, k_, v_, case.kernel, bias), "", None))
    if device == "cpu" and case.tokens > CPU_FULL_MAX_TOKENS:
        out.append(("full", None, f"> {CPU_FULL_MAX_TOKENS} tokens on CPU", None))
    else:
        out.append(("full", baselines.full_attention, "no bias" if rpb is not None else "",
                    None))
    if flex:
        if device != "cuda":
            out.append(("flex-na", None, "FlexAttention is benchmarked on CUDA only", None))
        else:
            try:
                fn, prep = _flex(case, device, rpb)
                out.append(("flex-na", fn, "" if fn else "unavailable with rpb", prep))
            except Exception as err:  # mask construction can run out of memory (3-D video)
                msg = str(err).strip().splitlines()[0][:80] if str(err).strip() else ""
                out.append(("flex-na", None, f"{type(err).__name__}: {msg}", None))
                torch.cuda.empty_cache()
    if include:
        out = [c for c in out if c[0] in include or c[0] == BASELINE]
    return out


# ----------------------------------------------------------------------------- run

def _flops(case: Case, grad: bool) -> int:
    """The FLOPs ``FlopCounterMode`` counts for the case's forward (and backward)."""
    nd = len(case.spatial)
    p = NAParams(spatial=case.spatial, kernel_size=case.kernel,
                 dilation=case.dilation or (1,) * nd, stride=(1,) * nd, is_causal=(False,) * nd,
                 scale=case.head_dim ** -0.5, batch=case.batch, heads=case.heads,
                 kv_heads=case.heads, head_dim=case.head_dim, num_extra=0, has_rpb=False)
    return na_flops(p) + (na_flops(p, backward=True) if grad else 0)


def run_case(case: Case, device: str, dtype: torch.dtype, modes: Sequence[str],
             rpb: bool = False, include: Optional[set] = None, reps: int = 10,
             flex: bool = True, log: Optional[Callable[[str], None]] = None) -> list[Result]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (case.batch, *case.spatial, case.heads, case.head_dim)

    def rand(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)
    q, k, v = rand(*shape), rand(*shape), rand(*shape)
    bias = None
    if rpb:
        bias = rand(case.heads, *(2 * kk - 1 for kk in case.kernel)) * 0.1
    results = []
    for mode in modes:
        if mode == "fwd+bwd" and case.fwd_only:
            continue
        grad = mode == "fwd+bwd"
        qq, kk_, vv = (t.detach().requires_grad_(grad) for t in (q, k, v))
        dout = rand(*shape) if grad else None
        rows, timed = [], []
        for name, fn, note, prep in contenders(case, device, qq, bias, grad, include, flex):
            r = Result(case.name, case.describe(), mode, name, rpb, note=note)
            rows.append(r)
            if fn is None:
                continue
            ins, g = (qq, kk_, vv), dout
            if prep is not None:
                ins = tuple(prep(t.detach()).requires_grad_(grad) for t in (q, k, v))
                g = prep(dout) if grad else None
            if grad:
                def call(fn=fn, ins=ins, g=g):
                    out = fn(*ins)
                    return torch.autograd.grad(out, ins, g)
            else:
                def call(fn=fn, ins=ins):
                    with torch.no_grad():
                        return fn(*ins)
            timed.append((r, call))
        t0 = time.perf_counter()
        errors = (RuntimeError, ValueError, torch.OutOfMemoryError)
        times = time_each_ms([call for _, call in timed], device, reps=reps, errors=errors)
        for (r, call), ms in zip(timed, times):
            if not isinstance(ms, Exception):
                try:
                    r.peak_mb = peak_memory_mb(call, device)
                except errors as err:
                    ms = err
            if isinstance(ms, Exception):
                r.note = f"{type(ms).__name__}: {str(ms).splitlines()[0][:80]}"
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            r.ms = ms
            if log is not None:
                log(f"  {case.name} {mode}{' rpb' if rpb else ''} {r.contender}: {r.ms:.3f} ms")
        if log is not None:
            log(f"  ({case.name} {mode}{' rpb' if rpb else ''}: "
                f"{time.perf_counter() - t0:.1f}s)")
        wsa = next((r.ms for r in rows if r.contender == BASELINE and r.ms), None)
        full = next((r.ms for r in rows if r.contender == "full" and r.ms), None)
        flops = _flops(case, grad)
        for r in rows:
            if r.ms:
                r.ratio_to_wsa = r.ms / wsa if wsa else None
                r.speedup_over_full = full / r.ms if full else None
                if r.contender.startswith("natkit") or r.contender == "flex-na":
                    r.tflops = flops / (r.ms * 1e-3) / 1e12
        results += rows
    return results


def format_table(results: Sequence[Result]) -> str:
    head = ["case", "shape", "mode", "rpb", "contender", "ms", "peak MB", "x WSA", "full/x",
            "note"]
    rows = [head]
    skipped: dict[str, str] = {}
    for r in results:
        if r.ms is None and r.contender != BASELINE and r.contender != "full":
            skipped.setdefault(r.contender, r.note)  # e.g. GPU-only contenders on a CPU
            continue
        rows.append([r.case, r.shape, r.mode, "y" if r.rpb else "", r.contender,
                     f"{r.ms:.3f}" if r.ms else "-",
                     f"{r.peak_mb:.1f}" if r.peak_mb is not None else "-",
                     f"{r.ratio_to_wsa:.2f}" if r.ratio_to_wsa else "-",
                     f"{r.speedup_over_full:.2f}" if r.speedup_over_full else "-", r.note])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"not run: {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines)


def write_csv(results: Sequence[Result], path: str, extra: Optional[dict] = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(asdict(results[0]).keys()) + sorted(extra or {})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            w.writerow({**asdict(r), **(extra or {})})


def plot(results: Sequence[Result], path: str, title: str) -> None:
    """Bars of time relative to Swin WSA (lower is better), one panel per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("fwd", "fwd+bwd") if any(r.mode == m for r in results)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2), squeeze=False)
    names = []
    for r in results:
        if r.contender not in names:
            names.append(r.contender)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in results if r.mode == mode]
        cases = []
        for r in rows:
            key = (r.case, r.rpb)
            if key not in cases:
                cases.append(key)
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            xs, ys = [], []
            for j, key in enumerate(cases):
                r = next((r for r in rows if (r.case, r.rpb) == key and r.contender == name),
                         None)
                if r is not None and r.ms:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(r.ratio_to_wsa if r.ratio_to_wsa else float("nan"))
            if xs:
                ax.bar(xs, ys, width, label=name)
                for x, y in zip(xs, ys):
                    if math.isfinite(y):
                        ax.annotate(f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c + (" +rpb" if b else "") for c, b in cases], fontsize=8)
        ax.set_yscale("log")
        from matplotlib.ticker import FormatStrFormatter, LogLocator
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("time / Swin WSA time (lower is better)")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
