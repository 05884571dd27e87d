"""Datasets for the command line: the built-in digits set and ImageFolder directories.

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, grayscale, ships inside the
  scikit-learn wheel: no download), upsampled to 32x32, with a fixed stratified 80/20
  split. Augmentation (small random affine) runs batch-wise on the training device.
- an ImageFolder root: ``ROOT/train/<class>/*.png|jpg...`` and ``ROOT/val/<class>/...``
  (the ImageNet layout). Channels (grayscale or RGB) and the default image size come
  from the data: ``inspect_images`` reads up to 32 files spread over the classes.

``preprocess`` (a plain dict saved in every checkpoint) says how to turn an image file
into the model's input, so ``natkit eval``/``natkit predict`` match training.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_SIZE = 32
DIGITS_MEAN, DIGITS_STD = (0.5,), (0.5,)


class DataError(ValueError):
    """A dataset path or file the user gave cannot be used (message says why)."""


def _warn(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        from .common import warn
        warn(msg)


@dataclass
class DataSpec:
    name: str
    train: Optional[Dataset]
    val: Dataset
    classes: list[str]
    in_chans: int
    img_size: int
    preprocess: dict
    # batch-level training augmentation on the device: (images) -> images
    augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    loader_workers: int = 0
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- digits

def _digits_arrays():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("the built-in 'digits' dataset needs scikit-learn "
                        "(pip install scikit-learn)") from err
    d = load_digits()
    return torch.from_numpy(d.images).float() / 16.0, torch.from_numpy(d.target).long()


def digits_split(val_fraction: float = 0.2):
    """Fixed stratified split of the 1,797 digits: the same on every machine and run."""
    images, labels = _digits_arrays()
    g = torch.Generator().manual_seed(1234)
    train_idx, val_idx = [], []
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * val_fraction)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    train_idx, val_idx = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def _digits_tensor(images8: torch.Tensor) -> torch.Tensor:
    """``[N, 8, 8]`` in [0, 1] -> normalized ``[N, 1, 32, 32]``."""
    x = F.interpolate(images8[:, None], size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear",
                      align_corners=False)
    return (x - DIGITS_MEAN[0]) / DIGITS_STD[0]


def random_affine(x: torch.Tensor, max_shift: float = 0.1, max_rotate: float = 10.0,
                  scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Per-image random shift/rotation/scale of ``[N, C, H, W]`` (global torch RNG, on CPU
    so that runs are reproducible whatever the device); borders replicate the edge."""
    n = x.shape[0]
    angle = (torch.rand(n) * 2 - 1) * math.radians(max_rotate)
    s = torch.empty(n).uniform_(*scale)
    shift = (torch.rand(n, 2) * 2 - 1) * max_shift * 2  # grid coordinates span 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def digits_data() -> DataSpec:
    (xt, yt), (xv, yv) = digits_split()
    preprocess = {"kind": "digits", "in_chans": 1, "img_size": DIGITS_SIZE,
                  "mean": list(DIGITS_MEAN), "std": list(DIGITS_STD)}
    return DataSpec("digits", TensorDataset(_digits_tensor(xt), yt),
                    TensorDataset(_digits_tensor(xv), yv), [str(c) for c in range(10)],
                    1, DIGITS_SIZE, preprocess, augment=random_affine)


def export_digits(out: str) -> dict[str, int]:
    """Writes the digits split as an ImageFolder (``out/train``, ``out/val``, 8x8 PNGs)."""
    from PIL import Image
    counts = {}
    for split, (images, labels) in zip(("train", "val"), digits_split()):
        per_class: dict[int, int] = {}
        for img, label in zip(images, labels):
            label = int(label)
            d = os.path.join(out, split, str(label))
            os.makedirs(d, exist_ok=True)
            k = per_class[label] = per_class.get(label, -1) + 1
            arr = (img * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(os.path.join(d, f"{k:04d}.png"))
        counts[split] = len(labels)
    return counts


# ----------------------------------------------------------------------------- folders

def list_images(folder: str) -> list[str]:
    """The image files under ``folder``, sorted: sub-folders included (a symlinked folder
    once), names starting with '.' skipped (``.ipynb_checkpoints``, ``._x.jpg``...)."""
    files, seen = [], set()
    for dirpath, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a second link to a folder: once only
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(dirpath, n) for n in names
                  if not n.startswith(".") and n.lower().endswith(IMG_EXTENSIONS)]
    return sorted(files)


def scan_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names, those starting with '.' skipped) and
    ``(path, class_index)`` samples (``list_images`` of each class folder)."""
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root!r} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"dataset folder {root!r} has no class sub-folders "
                        f"(expected {root}/<class>/<image files>)")
    samples, empty = [], []
    for i, c in enumerate(classes):
        files = list_images(os.path.join(root, c))
        if not files:
            empty.append(c)
        samples += [(f, i) for f in files]
    if empty:
        shown = ", ".join(repr(c) for c in empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise DataError(f"dataset folder {root!r}: {len(empty)} class folder(s) contain no "
                        f"image files ({', '.join(IMG_EXTENSIONS)}): {shown}")
    return classes, samples


def _to_8bit(img):
    """16-bit, 32-bit-integer and float images as 8-bit ``L`` (Pillow's ``convert`` would
    clip them, most to solid white), by the range the values fit: ``I;16*`` (16-bit) is
    divided by 257 with rounding; ``I`` and ``F`` (a 16-bit PGM or TIFF opens as ``I``, a
    float TIFF as ``F``) are kept when they fit 0..255, divided by 257 when larger (16-bit
    data), and ``F`` within [0, 1] is multiplied by 255; then clipped to 0..255 (negative
    values are 0)."""
    import numpy as np
    from PIL import Image
    arr = np.asarray(img).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    top = finite.max() if finite.size else 0.0
    if img.mode.startswith("I;16") or top > 255:
        arr = arr / 257
    elif img.mode == "F" and top <= 1:
        arr = arr * 255
    arr = np.nan_to_num(np.rint(arr), nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def open_image(path: str, in_chans: int):
    """PIL image in the model's channel mode (``L`` or ``RGB``); a clear DataError if
    unreadable. 16-bit, 32-bit-integer and float images are rescaled to 8 bits first
    (``_to_8bit``: 16-bit values / 257, floats in [0, 1] * 255, values within 0..255 kept),
    so that a 16-bit PNG gives the input its 8-bit version gives. The EXIF orientation tag
    is not applied, as in timm and torchvision (whose ImageNet evaluation numbers assume
    that)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I") or img.mode == "F":
                img = _to_8bit(img)
            return img.convert("L" if in_chans == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
            Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path!r}: {err}") from None


def image_channels(path: str) -> int:
    """1 for grayscale modes (8-bit, 16-bit, integer, float, bilevel), 3 otherwise."""
    return _mode_channels(_header(path)[0])


def _mode_channels(mode: str) -> int:
    return 1 if mode in ("1", "L", "LA", "F") or mode.startswith("I") else 3


def _header(path: str) -> tuple[str, tuple[int, int]]:
    """``(mode, (w, h))`` of an image file, without decoding its pixels."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except (OSError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path!r}: {err}") from None


def _default_size(side: int) -> int:
    """224 for ImageNet-sized images; smaller images keep their size (rounded up to 32)."""
    return 224 if side >= 224 else max(32, -(-side // 32) * 32)


SAMPLE_IMAGES = 32


def inspect_images(paths: list[str], in_chans: Optional[int] = None,
                   img_size: Optional[int] = None) -> tuple[int, int]:
    """A dataset's channels and input size (``in_chans``/``img_size`` when given) from up to
    ``SAMPLE_IMAGES`` of its files, evenly spaced through ``paths`` (sorted by class, so
    spread over the classes): 3 channels if any sampled file is colour; the size from the
    median of their longer sides (224 from 224 pixels up, else rounded up to a multiple of
    32). A warning says what was chosen when the sampled files disagree."""
    k = min(SAMPLE_IMAGES, len(paths))
    sample = [paths[i * len(paths) // k] for i in range(k)]
    headers = [_header(p) for p in sample] if in_chans is None or img_size is None else []
    if in_chans is None:
        gray = [p for p, (mode, _) in zip(sample, headers) if _mode_channels(mode) == 1]
        in_chans = 1 if len(gray) == len(sample) else 3
        if gray and in_chans == 3:
            _warn(f"{len(gray)} of {len(sample)} sampled images are grayscale (e.g. "
                  f"{gray[0]!r}), the others colour: using 3 channels (grayscale images are "
                  f"repeated over R, G, B)")
    if img_size is None:
        sides = sorted(max(wh) for _, wh in headers)
        median = sides[(len(sides) - 1) // 2]
        img_size = _default_size(median)
        if _default_size(sides[0]) != _default_size(sides[-1]):
            _warn(f"the longer sides of {len(sides)} sampled images range from {sides[0]} to "
                  f"{sides[-1]} pixels: input size {img_size} from their median {median} "
                  f"(--img-size sets it)")
    return in_chans, img_size


def eval_geometry(w: int, h: int, size: int, crop_pct: float):
    """Where the evaluation transform of a ``w x h`` image resizes it and crops: exactly
    timm's eval transform (torchvision ``Resize(floor(size / crop_pct))`` of the shorter side,
    the longer side truncated, then ``CenterCrop(size)`` with rounded offsets).
    Returns ``((new_w, new_h), (left, top))``."""
    short_target = math.floor(size / crop_pct)
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(short_target * long / short)
    new_w, new_h = (short_target, new_long) if w <= h else (new_long, short_target)
    return (new_w, new_h), (int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0)))


def _to_tensor(img, mean, std) -> torch.Tensor:
    import numpy as np
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy())
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s


def eval_transform(img, preprocess: dict) -> torch.Tensor:
    """File image -> normalized ``[C, S, S]`` input, as the model saw validation images."""
    from PIL import Image
    size = preprocess["img_size"]
    if preprocess["kind"] == "digits":
        # digits are 8x8 block averages; re-create that, then upsample as training did
        small = img.convert("L").resize((8, 8), Image.BOX)
        t = _to_tensor(small, [0.0], [1.0])
        return _digits_tensor(t)[0]
    new_size, (left, top) = eval_geometry(*img.size, size, preprocess.get("crop_pct", 1.0))
    img = img.resize(new_size, Image.BICUBIC)  # PIL returns a copy when the size is the same
    img = img.crop((left, top, left + size, top + size))
    return _to_tensor(img, preprocess["mean"], preprocess["std"])


def train_transform(img, preprocess: dict) -> torch.Tensor:
    """Random-resized crop + horizontal flip (torch RNG: seeded per DataLoader worker)."""
    size = preprocess["img_size"]
    w, h = img.size
    lo = preprocess.get("min_crop_scale", 0.08)
    for _ in range(10):
        area = w * h * float(torch.empty(1).uniform_(lo, 1.0))
        logr = torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3))
        ratio = math.exp(float(logr))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, (1,)))
            top = int(torch.randint(0, h - ch + 1, (1,)))
            break
    else:
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    from PIL import Image
    img = img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    if preprocess.get("hflip", 0.5) > 0 and float(torch.rand(1)) < preprocess.get("hflip", 0.5):
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_tensor(img, preprocess["mean"], preprocess["std"])


class FolderDataset(Dataset):
    def __init__(self, samples, preprocess: dict, train: bool):
        self.samples, self.preprocess, self.train = samples, preprocess, train

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = open_image(path, self.preprocess["in_chans"])
        fn = train_transform if self.train else eval_transform
        return fn(img, self.preprocess), label


def folder_preprocess(images, img_size: Optional[int], in_chans: Optional[int] = None,
                      hflip: float = 0.5) -> dict:
    """The preprocessing of an ImageFolder dataset whose files are ``images`` (a path or a
    sorted list; ``inspect_images`` reads channels and size unless given)."""
    chans, size = inspect_images([images] if isinstance(images, str) else images, in_chans,
                                 img_size)
    gray = chans == 1
    return {"kind": "folder", "in_chans": chans, "img_size": size,
            "crop_pct": 0.875 if size >= 128 else 1.0,
            "min_crop_scale": 0.08 if size >= 128 else 0.35, "hflip": hflip,
            "mean": [0.5] if gray else list(IMAGENET_MEAN),
            "std": [0.5] if gray else list(IMAGENET_STD)}


def folder_data(root: str, img_size: Optional[int] = None, workers: Optional[int] = None,
                hflip: float = 0.5, need_train: bool = True,
                preprocess: Optional[dict] = None) -> DataSpec:
    """``root/train`` and ``root/val`` (``need_train=False``: only ``val``, or ``root`` itself
    when it holds class folders directly)."""
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root!r} does not exist or is not a directory")
    train = None
    val_root = os.path.join(root, "val")
    if need_train:
        classes, train_samples = scan_folder(os.path.join(root, "train"))
        if not os.path.isdir(val_root):
            raise DataError(f"dataset folder {root!r} has no val/ folder (expected "
                            f"{root}/train/<class>/... and {root}/val/<class>/...)")
    elif not os.path.isdir(val_root):
        val_root = root
    val_classes, val_samples = scan_folder(val_root)
    if need_train and val_classes != classes:
        missing = sorted(set(classes) ^ set(val_classes))[:10]
        raise DataError(f"dataset folder {root!r}: train/ and val/ have different class "
                        f"folders (differing: {missing})")
    classes = val_classes if not need_train else classes
    pre = preprocess or folder_preprocess(
        [p for p, _ in (train_samples if need_train else val_samples)], img_size, hflip=hflip)
    if need_train:
        train = FolderDataset(train_samples, pre, train=True)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    return DataSpec(os.path.basename(os.path.normpath(root)) or root, train,
                    FolderDataset(val_samples, pre, train=False), classes, pre["in_chans"],
                    pre["img_size"], pre, loader_workers=workers)


def make_data(data: str, img_size: Optional[int] = None, workers: Optional[int] = None,
              hflip: float = 0.5, need_train: bool = True,
              preprocess: Optional[dict] = None) -> DataSpec:
    """``data='digits'`` (built-in, also when a folder ``./digits`` exists: a warning says
    so) or an ImageFolder root."""
    if data == "digits":
        if os.path.isdir("digits"):
            _warn(f"--data digits is the built-in dataset; the folder "
                  f"{os.path.abspath('digits')!r} is not used (for it: --data ./digits)")
        if img_size not in (None, DIGITS_SIZE):
            raise DataError(f"--img-size must be {DIGITS_SIZE} (or unset) for the digits dataset,"
                            f" got {img_size}")
        if preprocess is not None and preprocess.get("kind") != "digits":
            raise DataError("the checkpoint was not trained on the digits dataset; pass the "
                            "ImageFolder it expects with --data")
        return digits_data()
    return folder_data(data, img_size, workers, hflip, need_train, preprocess)
