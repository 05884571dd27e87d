"""``natkit bench``: neighborhood attention vs Swin window attention vs full attention
(vs FlexAttention on GPU): table, CSV and PNG plot. ``--models``: NAT vs Swin-T."""

from __future__ import annotations

import argparse
import os
import time

import torch

from .common import CLIError, check_number, check_writable, info, list_models, make_folder
from .distributed import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_parser(sub) -> None:
    from natkit.bench.runner import GROUPS, PRESETS
    p = sub.add_parser(
        "bench", help="benchmark NA kernels against Swin window attention and full attention",
        description="Time natkit's backends, Swin window self-attention (the baseline of the "
                    "ratios), full attention (SDPA) and, on CUDA, FlexAttention with a "
                    "neighborhood mask, forward and forward+backward, on presets or a custom "
                    "shape. Prints a table and writes OUT/bench.csv and OUT/bench.png.",
        epilog=f"presets: {', '.join(PRESETS)}; groups: "
               + "; ".join(f"{g} = {', '.join(m)}" for g, m in GROUPS.items()))
    p.add_argument("--preset", nargs="+", help="preset or group names (default: nat)")
    p.add_argument("--shape", help="custom shape BATCHxD1[xD2[xD3]], e.g. 8x56x56")
    p.add_argument("--heads", type=int, help="custom shape: heads (4)")
    p.add_argument("--head-dim", type=int, help="custom shape: head dim (32)")
    p.add_argument("--kernel", help="custom shape: kernel, int or AxB (7)")
    p.add_argument("--dilation", default=None, help="custom shape: dilation, int or AxB")
    p.add_argument("--batch", type=int, help="override the presets' batch size")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="both")
    p.add_argument("--rpb", choices=["no", "yes", "both"], default="no",
                   help="with relative positional bias (natkit and WSA)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--contenders", nargs="+", help="only these (e.g. natkit-torch full); "
                                                   "swin-wsa always runs")
    p.add_argument("--reps", type=int, default=10, help="CPU repetitions per timing")
    p.add_argument("--out", default="bench-results", help="folder for bench.csv / bench.png")
    p.add_argument("--quiet", action="store_true", help="no per-contender progress lines")
    p.add_argument("--models", action="store_true",
                   help="instead: NAT-Tiny vs timm Swin-T images/s (inference, train step)")
    p.add_argument("--model-names", nargs="+", default=["nat_tiny"],
                   help="--models: natkit models to time (nat_tiny)")
    p.add_argument("--img-size", type=int, default=224, help="--models: input size")
    p.add_argument("--compile", action="store_true",
                   help="--models: every model through torch.compile (compiled in the warmup)")
    p.set_defaults(func=run)


def _ints(text: str, name: str, n: int) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise CLIError(f"--{name} must be an int or AxB..., got {text!r}") from None
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n or any(v < 1 for v in vals):
        raise CLIError(f"--{name} {text!r} needs {n} positive value(s)")
    return vals


def custom_case(args):
    from natkit.bench.runner import Case
    try:
        dims = tuple(int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        raise CLIError(f"--shape must look like 8x56x56 (batch x spatial), got "
                       f"{args.shape!r}") from None
    if not 2 <= len(dims) <= 4 or any(v < 1 for v in dims):
        raise CLIError(f"--shape needs a batch and 1-3 positive spatial sizes, got "
                       f"{args.shape!r}")
    nd = len(dims) - 1
    kernel = _ints(args.kernel or "7", "kernel", nd)
    dilation = _ints(args.dilation, "dilation", nd) if args.dilation else ()
    for s, k, d in zip(dims[1:], kernel, dilation or (1,) * nd):
        if k < 2 or k * d > s:
            raise CLIError(f"--kernel {args.kernel or 7} (dilation {args.dilation or 1}) does not "
                           f"fit the spatial size {s}: need 2 <= kernel*dilation <= size")
    return Case("custom", dims[0], dims[1:], args.heads or 4, args.head_dim or 32, kernel,
                dilation)


def _log(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> None:
    for option, value in (("--heads", args.heads), ("--head-dim", args.head_dim),
                          ("--reps", args.reps), ("--batch", args.batch),
                          ("--img-size", args.img_size)):
        check_number(value, option, 1)
    if args.shape is not None and args.preset:
        raise CLIError("give either --preset or --shape, not both")
    if args.shape is not None and args.batch is not None and not args.models:
        raise CLIError(f"--batch {args.batch} applies to the presets; a custom --shape "
                       f"starts with its batch (e.g. {args.batch}x56x56)")
    if args.shape is None:  # the presets fix these; silently ignoring them would mislead
        for option, value in (("--heads", args.heads), ("--head-dim", args.head_dim),
                              ("--kernel", args.kernel), ("--dilation", args.dilation)):
            if value is not None:
                raise CLIError(f"{option} {value} applies to a custom --shape only (the "
                               f"presets fix it)")
    if args.compile and not args.models:
        raise CLIError("--compile applies to --models only (the kernel benchmark times the "
                       "ops as they run eagerly)")
    if args.models:
        known = list_models()
        bad = [n for n in args.model_names if not n.startswith("timm:") and n not in known]
        if bad:
            raise CLIError(f"--model-names: unknown model(s) {bad}; available models: "
                           f"{', '.join(known)}")
    elif args.contenders:
        from natkit.backends import backends
        from natkit.bench.runner import BASELINE
        known = [f"natkit-{n}" for n in backends() if n != "reference"]
        known += [BASELINE, "full", "flex-na"]
        bad = [c for c in args.contenders if c not in known]
        if bad:
            raise CLIError(f"--contenders: unknown contender(s) {bad}; choose from "
                           f"{', '.join(known)}")
    check_writable(args.out, "--out", folder=True)


def run(args: argparse.Namespace) -> int:
    from natkit.bench import runner
    _check_args(args)
    device = resolve_device(args.device).type
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda"
                                                    else torch.float32)
    if args.models:
        from natkit.bench.models import SWIN_T, format_table, run_models, write_csv
        batch = args.batch or (128 if device == "cuda" else 8)
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        rows = run_models([*args.model_names, SWIN_T], device, batch, args.img_size,
                          steps=args.reps, warmup=max(1, args.reps // 3), dtype=amp,
                          compile=args.compile)
        print(format_table(rows))
        make_folder(args.out, "--out")
        path = os.path.join(args.out, "bench_models.csv")
        write_csv(rows, path)
        info(f"wrote {path}")
        return 0
    if args.shape is not None:
        cases = [custom_case(args)]
    else:
        try:
            cases = [runner.preset_case(n, device, args.batch)
                     for n in runner.expand_presets(args.preset or ["nat"])]
        except ValueError as err:
            raise CLIError(str(err)) from None
    modes = ["fwd", "fwd+bwd"] if args.mode == "both" else [args.mode]
    rpbs = {"no": [False], "yes": [True], "both": [False, True]}[args.rpb]
    include = set(args.contenders) if args.contenders else None
    results = []
    t0 = time.perf_counter()
    for case in cases:
        for rpb in rpbs:
            if rpb and (any(k % 2 == 0 for k in case.kernel)):
                info(f"{case.name}: skipping rpb (even kernel)")
                continue
            results += runner.run_case(case, device, dtype, modes, rpb, include, args.reps,
                                       log=None if args.quiet else _log)
    if not results:
        raise CLIError("nothing to run")
    label = (torch.cuda.get_device_name() if device == "cuda" else
             f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    title = (f"natkit bench on {label}, {str(dtype).replace('torch.', '')}, torch "
             f"{torch.__version__}")
    info(title)
    info(runner.format_table(results))
    make_folder(args.out, "--out")
    csv_path, png_path = os.path.join(args.out, "bench.csv"), os.path.join(args.out, "bench.png")
    runner.write_csv(results, csv_path, {"device": label, "dtype": str(dtype),
                                         "torch": torch.__version__})
    runner.plot(results, png_path, title)
    info(f"wrote {csv_path} and {png_path} ({time.perf_counter() - t0:.1f}s)")
    return 0
