"""GPU benchmark of the Triton backend against Swin WSA, full SDPA and Flex NA (BENCH.md shapes).

One run checks natkit against a baseline on every shape (max |diff|), then times forward
and forward+backward (``triton.testing.do_bench`` median, L2 flushed), reports effective
TFLOP/s (attended pairs only: 4·B·H·N·K·D forward, 3.5x that for forward+backward),
ratios against the baselines, the FLOP bound on the large shapes, and peak extra memory.
Prints a table last and writes every number to a CSV.

    PYTHONPATH=src python benchmarks/bench_gpu.py --csv bench_gpu.csv [--only s1,s3]

``--smoke`` runs every code path of the script on tiny shapes with one timed repetition:
on a GPU, or on the CPU with the Triton kernels in Triton's interpreter
(``TRITON_INTERPRET=1 NATKIT_TRITON_ON_CPU=1 ... --smoke --dtype float16``; full attention
then uses SDPA's math kernel). The test suite runs it that way, so that the script works
the first time a GPU is lent.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import natkit
from natkit._determinism import deterministic
from natkit.bench.baselines import full_attention, relative_bias_table, window_attention
from natkit.bench.flex import FlexNA
from natkit.bench.timing import peak_memory_mb, time_ms
import natkit.backends.triton as triton_backend
from natkit.backends.triton import configs
from natkit.backends.triton.work import tile_work

# name, batch, spatial, heads, dim, kernel, passes, rpb variants
SHAPES = [
    ("NAT-Tiny s1", 64, (56, 56), 2, 32, (7, 7), ("fwd", "fwd+bwd"), (False, True)),
    ("NAT-Tiny s3", 64, (14, 14), 8, 32, (7, 7), ("fwd", "fwd+bwd"), (False, True)),
    ("2D 128² k13", 1, (128, 128), 8, 128, (13, 13), ("fwd", "fwd+bwd"), (False,)),
    ("2D 256² k31", 1, (256, 256), 8, 128, (31, 31), ("fwd", "fwd+bwd"), (False,)),
    ("1D 32768 k2048", 1, (32768,), 24, 128, (2048,), ("fwd",), (False,)),
    ("2D FLUX k80", 1, (256, 256), 24, 128, (80, 80), ("fwd",), (False,)),
    ("3D video", 1, (30, 48, 80), 24, 128, (18, 24, 24), ("fwd",), (False,)),
]

# --smoke: the same kinds of rows (batched with both rpb variants and both passes; b == 1
# "large" shapes of every rank) at sizes Triton's interpreter runs in seconds
SMOKE_SHAPES = [
    ("smoke 2D", 2, (9, 10), 1, 16, (3, 3), ("fwd", "fwd+bwd"), (False, True)),
    ("smoke 1D", 1, (24,), 2, 16, (5,), ("fwd", "fwd+bwd"), (False,)),
    ("smoke 3D", 1, (4, 5, 6), 1, 16, (3, 2, 3), ("fwd",), (False,)),
]


def empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fwd_flops(b, spatial, h, d, kernel):
    return 4 * b * h * math.prod(spatial) * math.prod(kernel) * d


def make(fn_fwd, inputs, bwd: bool):
    """A closure running forward (and backward via autograd.grad, no .grad accumulation)."""
    if not bwd:
        def run():
            with torch.no_grad():
                return fn_fwd(*inputs)
        return run
    out = fn_fwd(*inputs)
    grad = torch.randn_like(out)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        o = fn_fwd(*inputs)
        return torch.autograd.grad(o, leaves, grad)
    return run


SDPA_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "math": SDPBackend.MATH}


def full_sdpa(kind):
    backend = SDPA_KERNELS[kind]

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return full_attention(q, k, v)
    return fn


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default="bench_gpu.csv")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--only", default="", help="comma-separated substrings of shape names")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, one repetition (on the CPU: Triton's interpreter)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not (args.smoke and triton_backend.interpreting()
                             and os.environ.get("NATKIT_TRITON_ON_CPU") == "1"
                             and dtype != torch.bfloat16):
        ap.error("no CUDA device: only --smoke runs on the CPU, in Triton's interpreter "
                 "(TRITON_INTERPRET=1 NATKIT_TRITON_ON_CPU=1, --dtype float16 or float32)")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    full_kinds = ("cudnn", "flash") if dev == "cuda" else ("math",)
    reps = dict(warmup=0, reps=1) if args.smoke else {}
    rows = []

    fields = ["shape", "rpb", "pass_", "impl", "ms", "tflops", "peak_mb", "note"]
    raw = open(args.csv, "w", newline="")
    writer = csv.DictWriter(raw, fieldnames=fields)
    writer.writeheader()

    def record(shape, rpb, pas, impl, ms, flops, mem=None, note=""):
        tf = flops / (ms * 1e-3) / 1e12 if ms and flops else None
        rows.append(dict(shape=shape, rpb=rpb, pass_=pas, impl=impl, ms=ms, tflops=tf,
                         peak_mb=mem, note=note))
        writer.writerow(rows[-1])
        raw.flush()
        print(f"  {shape:16s} rpb={int(rpb)} {pas:8s} {impl:12s} "
              f"{'' if ms is None else f'{ms:9.4f} ms'} "
              f"{'' if tf is None else f'{tf:7.1f} TFLOP/s'} "
              f"{'' if mem is None else f'{mem:9.1f} MiB'} {note}", flush=True)

    def tile_note(spatial, kernel, b, h, pas, rpb):
        """Tile work of the configs natkit just ran: scores computed per attended pair and
        the share paying for the window mask, per kernel."""
        ones = (1,) * len(spatial)
        notes = []
        kinds = ("fwd",)
        if pas == "fwd+bwd":
            scheme = configs.last_drpb_scheme() if rpb else None
            kinds += ("dq", "dkdv") + (("drpb",) if scheme == "separate" else ())
            if scheme is not None:
                notes.append(f"rpb gradient {scheme}")
        for kind in kinds:
            cfg = configs.last_chosen(kind)
            if cfg is not None:
                w = tile_work(spatial, kernel, ones, ones, (False,) * len(spatial), cfg, kind, b * h)
                notes.append(f"{kind} q{'x'.join(map(str, cfg.q_tile[3 - len(spatial):]))}"
                             f"/k{'x'.join(map(str, cfg.k_tile[3 - len(spatial):]))} "
                             f"w{cfg.num_warps}: waste {w.waste:.2f}, "
                             f"masked {100 * w.masked_fraction:.0f}%")
        return "; ".join(notes)

    def bench(shape, rpb, pas, impl, fn, inputs, flops, memory=True, note=None):
        try:
            run = make(fn, inputs, pas == "fwd+bwd")
            ms = time_ms(run, dev, **reps)
            mem = peak_memory_mb(run, dev) if memory else None
            record(shape, rpb, pas, impl, ms, flops, mem, note() if note else "")
            return ms
        except Exception as err:  # noqa: BLE001 - a baseline failing (OOM) is a result
            msg = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            record(shape, rpb, pas, impl, None, None, None, msg)
            empty_cache()
            return None

    only = [s for s in args.only.split(",") if s]
    for name, b, spatial, h, d, kernel, passes, rpbs in shapes:
        if only and not any(o in name for o in only):
            continue
        print(f"== {name}: B={b} spatial={spatial} heads={h} dim={d} kernel={kernel}", flush=True)
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, *spatial, h, d, device=dev, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        flops = fwd_flops(b, spatial, h, d, kernel)
        n = math.prod(spatial)
        large = b == 1
        for rpb in rpbs:
            table = (torch.randn(h, *(2 * x - 1 for x in kernel), device=dev, dtype=dtype) * 0.5
                     ).requires_grad_() if rpb else None

            def na(q, k, v, table=table):
                return natkit.neighborhood_attention(q, k, v, kernel, rpb=table, backend="triton")

            # correctness on this very shape vs an independent implementation
            with torch.no_grad():
                out = na(q, k, v)
                if not large:
                    ref = natkit.neighborhood_attention(q[:2], k[:2], v[:2], kernel, rpb=table,
                                                        backend="torch")
                    err = (out[:2].float() - ref.float()).abs().max().item()
                    record(name, rpb, "check", "vs torch", None, None, None, f"max|diff|={err:.2e}")
            flex = None
            if not args.no_flex:
                try:
                    flex = FlexNA(spatial, kernel, rpb=table.detach() if rpb else None,
                                  device=dev)
                    qt, kt, vt = (flex.to_tiled(t.detach()).requires_grad_() for t in (q, k, v))
                    with torch.no_grad():
                        fo = flex.from_tiled(flex(qt, kt, vt))
                        err = (fo.float() - out.float()).abs().max().item()
                    record(name, rpb, "check", "vs flex", None, None, None, f"max|diff|={err:.2e}")
                    del fo
                except Exception as err:  # noqa: BLE001
                    record(name, rpb, "check", "flex", None, None, None,
                           f"{type(err).__name__}: {str(err).splitlines()[0][:80]}")
                    flex = None
                    empty_cache()
            del out
            for pas in passes:
                f = flops * (3.5 if pas == "fwd+bwd" else 1.0)
                inputs = (q, k, v) if not rpb else (q, k, v, table)
                nat = (lambda q, k, v, t=None: na(q, k, v, t)) if rpb else na
                bench(name, rpb, pas, "natkit", nat, inputs, f,
                      note=lambda: tile_note(spatial, kernel, b, h, pas, rpb))
                if rpb and pas == "fwd+bwd":  # both rpb-gradient schemes, forced (configs.py)
                    for scheme in configs.DRPB_SCHEMES:
                        with configs.override(drpb=scheme):
                            bench(name, rpb, pas, f"natkit_{scheme}", nat, inputs, f,
                                  note=lambda: tile_note(spatial, kernel, b, h, pas, rpb))
                if pas == "fwd+bwd" and not large:  # torch.use_deterministic_algorithms
                    with deterministic():
                        bench(name, rpb, pas, "natkit_deterministic", nat, inputs, f,
                              note=lambda: tile_note(spatial, kernel, b, h, pas, rpb))
                if not large:
                    bias = relative_bias_table(table.detach(), kernel).requires_grad_() if rpb else None
                    win_in = (q, k, v, bias) if rpb else (q, k, v)
                    bench(name, rpb, pas, "swin_wsa",
                          lambda q, k, v, bias=None: window_attention(q, k, v, kernel, bias),
                          win_in, None)
                if flex is not None:
                    bench(name, rpb, pas, "flex_na", flex, (qt, kt, vt), f)
                if not rpb:
                    for kind in full_kinds:
                        full_f = 4 * b * h * n * n * d * (3.5 if pas == "fwd+bwd" else 1.0)
                        bench(name, rpb, pas, f"full_{kind}", full_sdpa(kind), (q, k, v), full_f)
            del flex
            empty_cache()
        del q, k, v
        empty_cache()

    # derived: ratios and FLOP bound
    def get(shape, rpb, pas, impl):
        for r in rows:
            if (r["shape"], r["rpb"], r["pass_"], r["impl"]) == (shape, rpb, pas, impl):
                return r["ms"]
        return None

    summary = []
    for name, b, spatial, h, d, kernel, passes, rpbs in shapes:
        if only and not any(o in name for o in only):
            continue
        kfrac = math.prod(kernel) / math.prod(spatial)
        for rpb in rpbs:
            for pas in passes:
                swin = get(name, rpb, pas, "swin_wsa")
                flex = get(name, rpb, pas, "flex_na")
                fulls = [x for x in (get(name, False, pas, f"full_{kind}") for kind in full_kinds)
                         if x]
                full = min(fulls) if fulls else None
                impls = ["natkit"] + ([f"natkit_{s}" for s in configs.DRPB_SCHEMES]
                                      if rpb and pas == "fwd+bwd" else [])
                if pas == "fwd+bwd" and get(name, rpb, pas, "natkit_deterministic"):
                    impls.append("natkit_deterministic")
                for impl in impls:  # the autotuned run, each rpb-gradient scheme forced, and
                    # deterministic mode (default configs, the rpb gradient without atomics)
                    nat = get(name, rpb, pas, impl)
                    label = name if impl == "natkit" else f"{name} ({impl[7:]})"
                    summary.append(dict(
                        shape=label, rpb=rpb, pass_=pas, natkit_ms=nat,
                        vs_swin=(nat / swin) if nat and swin else None,
                        flex_speedup=(flex / nat) if nat and flex else None,
                        full_speedup=(full / nat) if nat and full else None,
                        bound_speedup=(1 / kfrac) if b == 1 else None,
                        pct_bound=((full * kfrac) / nat) if nat and full and b == 1 else None))

    raw.close()
    with open(args.csv.replace(".csv", "_summary.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0].keys()))
        w.writeheader()
        w.writerows(summary)

    fmt = lambda x, f="{:.2f}": "–" if x is None else f.format(x)  # noqa: E731
    times = lambda x: fmt(x, "{:.2f}x")  # noqa: E731
    where = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter)"
    print(f"\n{where}, {args.dtype}, torch {torch.__version__}")
    print("| shape | rpb | pass | natkit ms | natkit / Swin | Flex / natkit | full / natkit | FLOP bound | % of bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['shape']} | {'yes' if s['rpb'] else 'no'} | {s['pass_']} | "
              f"{fmt(s['natkit_ms'], '{:.3f}')} | {fmt(s['vs_swin'])} | {times(s['flex_speedup'])} | "
              f"{times(s['full_speedup'])} | {fmt(s['bound_speedup'], '{:.1f}x')} | "
              f"{fmt(None if s['pct_bound'] is None else 100 * s['pct_bound'], '{:.0f}%')} |")


if __name__ == "__main__":
    sys.exit(main())
