"""The CLI's image data handling (``natkit.cli.data``, ``predict``, ``eval``): bit depths,
folder inspection, eval geometry, option bounds, hidden entries, predict in chunks.

Small synthetic images made with PIL in ``tmp_path``; the few CLI runs use a tiny
``nat_micro`` trained for one epoch on a 3-class folder.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from natkit.cli import data as D
from natkit.cli import main


def _gray(seed=0, h=20, w=24):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


# ----------------------------------------------------------------------------- bit depths

def test_16bit_32bit_and_float_images_match_their_8bit_version(tmp_path):
    """16-bit PNGs (and I/F images) were clipped to solid white by Pillow's convert."""
    a = _gray()
    paths = {"8bit.png": Image.fromarray(a),
             "16bit.png": Image.fromarray(a.astype(np.uint16) * 257),
             "16bit.pgm": Image.fromarray(a.astype(np.uint16) * 257),
             "int32.tif": Image.fromarray(a.astype(np.int32) * 257),
             "float01.tif": Image.fromarray(a.astype(np.float32) / 255),
             "float16range.tif": Image.fromarray(a.astype(np.float32) * 257)}
    modes = {}
    for name, img in paths.items():
        img.save(tmp_path / name)
        with Image.open(tmp_path / name) as f:
            modes[name] = f.mode
    assert modes["16bit.png"].startswith("I;16") and modes["int32.tif"] == "I"
    assert modes["float01.tif"] == "F"
    pre = D.folder_preprocess(str(tmp_path / "8bit.png"), 16)
    for chans in (1, 3):
        pre = {**pre, "in_chans": chans}
        ref = D.eval_transform(D.open_image(str(tmp_path / "8bit.png"), chans), pre)
        for name in paths:
            assert D.image_channels(str(tmp_path / name)) == 1
            img = D.open_image(str(tmp_path / name), chans)
            assert np.array_equal(np.asarray(img.convert("L")), a), name
            x = D.eval_transform(img, pre)
            assert x.shape == ref.shape and torch.equal(x, ref), name
    big_endian = Image.frombytes("I;16B", (24, 20), (a.astype(">u2") * 257).tobytes())
    assert np.array_equal(np.asarray(D._to_8bit(big_endian)), a)
