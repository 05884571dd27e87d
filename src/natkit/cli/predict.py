"""``natkit predict``: image files (or folders of them) -> top-k classes with probabilities,
printed batch by batch."""

from __future__ import annotations

import argparse
import json
import os

import torch

from .common import (CLIError, add_preprocess_options, check_crop_pct, check_img_size,
                     check_number, check_resize, check_writable, info, write_json)
from .data import (IMG_EXTENSIONS, DataError, eval_transform, image_channels, list_images,
                   open_image)
from .distributed import resolve_device
from .loading import load_for_inference, num_outputs, official_preprocess


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="top-k classes of image files",
        description="Classify image files with a natkit checkpoint (class names come from it) "
                    "or an official NAT/DiNAT checkpoint (--model; names from --classes). "
                    "Images are read and classified --batch-size at a time; each batch's "
                    "results are printed when it finishes.")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", help="image files, or folders: a folder's image files "
                                             "(sub-folders included, sorted; names starting "
                                             "with '.' skipped)")
    p.add_argument("--model", help="model name (required for official checkpoints)")
    p.add_argument("--classes", help="class names: a text file with one name per line, or a "
                                     "JSON list / {index: name} object")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (32)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a last.pt")
    add_preprocess_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", dest="json_out", help="also write the predictions to this file")
    p.set_defaults(func=run)


def read_class_names(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f"--classes file {path!r} does not exist or is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read --classes file {path!r} as UTF-8 text: {err}") from None
    if path.endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"--classes file {path!r} is not valid JSON: {err}") from None
        if isinstance(obj, dict):  # {"0": "tench", ...} or {"0": ["n01440764", "tench"]}
            try:
                keys = sorted(obj, key=int)
            except ValueError:
                keys = None
            if keys is None or [int(k) for k in keys] != list(range(len(obj))):
                raise DataError(f"--classes file {path!r}: the keys of a JSON object must be "
                                f"the class indices 0..{len(obj) - 1}, got "
                                f"{sorted(obj)[:10]}")
            names = [obj[k] for k in keys]
            return [n[-1] if isinstance(n, list) and n else str(n) for n in names]
        if not isinstance(obj, list):
            raise DataError(f"--classes file {path!r} must hold a JSON list of names or an "
                            f"{{index: name}} object, not a {type(obj).__name__}")
        return [str(n) for n in obj]
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def image_files(args: list[str]) -> list[str]:
    """The command line's images: files as given, folders as their ``list_images``."""
    files = []
    for path in args:
        if os.path.isdir(path):
            found = list_images(path)
            if not found:
                raise DataError(f"folder {path!r} holds no image files "
                                f"({', '.join(IMG_EXTENSIONS)})")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"image file or folder {path!r} does not exist")
    return files


def run(args: argparse.Namespace) -> int:
    check_number(args.topk, "--topk", 1)
    check_number(args.batch_size, "--batch-size", 1)
    check_img_size(args.img_size)
    check_crop_pct(args.crop_pct)
    files = image_files(args.images)
    if args.json_out is not None:
        check_writable(args.json_out, "--json", folder=False, inputs=[args.checkpoint, *files])
    model, meta = load_for_inference(args.checkpoint, args.model, args.ema, args.img_size)
    if meta["preprocess"] is not None and (args.img_size, args.crop_pct) != (None, None):
        raise CLIError("--img-size/--crop-pct apply to official checkpoints only (a natkit "
                       "checkpoint carries its preprocessing)")
    pre = meta["preprocess"] or official_preprocess(model, args.img_size, args.crop_pct)
    check_resize(pre)
    names = read_class_names(args.classes) if args.classes else meta["classes"]
    device = resolve_device(args.device)
    model.to(device)
    n_out = num_outputs(model, pre["in_chans"], pre["img_size"], device)
    if names is not None and len(names) != n_out:
        raise CLIError(f"{len(names)} class names for a model with {n_out} outputs")
    k = min(args.topk, n_out)
    results = []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        batch = torch.stack([eval_transform(open_image(p, pre["in_chans"]), pre)
                             for p in chunk]).to(device)
        with torch.no_grad():
            top = model(batch).float().softmax(-1).cpu().topk(k, dim=-1)
        del batch  # freed before the next chunk is decoded
        for path, pv, iv in zip(chunk, top.values, top.indices):
            preds = [{"index": int(i), "name": names[int(i)] if names else str(int(i)),
                      "prob": float(p)} for p, i in zip(pv, iv)]
            results.append({"image": path, "top": preds})
            info(f"{path}: " + ", ".join(f"{q['name']} {100 * q['prob']:.1f}%" for q in preds))
    if args.json_out:
        write_json(results, args.json_out, "--json")
    return 0


__all__ = ["run", "add_parser", "read_class_names", "image_channels"]
