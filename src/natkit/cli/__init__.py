"""The ``natkit`` command: ``train``, ``eval``, ``predict``, ``bench``, ``export-digits``.

Every subcommand module exposes ``add_parser(subparsers)``; the parser's ``func`` runs it.
User errors (bad paths, unreadable files, unknown models, mismatching checkpoints) are
printed as one ``natkit <command>: error: ...`` line with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    from . import bench, evaluate, predict, train
    from .data import export_digits

    parser = argparse.ArgumentParser(
        prog="natkit", description="Neighborhood attention: train, evaluate and run NAT/DiNAT "
                                   "models, and benchmark the kernels.")
    from natkit import __version__
    parser.add_argument("--version", action="version", version=f"natkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train.add_parser(sub)
    evaluate.add_parser(sub)
    predict.add_parser(sub)
    bench.add_parser(sub)
    p = sub.add_parser("export-digits", help="write the built-in digits as an ImageFolder",
                       description="Write the built-in digits dataset (the same train/val split "
                                   "'natkit train' uses) as 8x8 PNGs in OUT/train/<digit>/ and "
                                   "OUT/val/<digit>/.")
    p.add_argument("out", help="output folder")

    def _export(args):
        from .common import check_writable, make_folder
        check_writable(args.out, "OUT", folder=True)
        make_folder(args.out, "OUT")
        counts = export_digits(args.out)
        print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")
        return 0
    p.set_defaults(func=_export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``natkit`` console script and ``python -m natkit``."""
    from .checkpoint import CheckpointError
    from .common import CLIError
    from .data import DataError

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, CheckpointError, DataError) as err:
        msg = str(err)
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker
            msg = _last_line(msg).split("Error: ", 1)[-1]
        _error(args.command, msg)
        return 2
    except KeyboardInterrupt:
        _error(args.command, "interrupted")
        return 130


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _error(command: str, message: str) -> None:
    rank = os.environ.get("RANK")
    prefix = f"natkit {command}" + (f" [rank {rank}]" if rank not in (None, "0") else "")
    print(f"{prefix}: error: {message}", file=sys.stderr, flush=True)
