"""The CLI's image data handling (``natkit.cli.data``, ``predict``, ``eval``): bit depths,
folder inspection, eval geometry, option bounds, hidden entries, predict in chunks.

Small synthetic images made with PIL in ``tmp_path``; the few CLI runs use a tiny
``nat_micro`` trained for one epoch on a 3-class folder.
"""

import json
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
    """16-bit PNGs (and I/F images) were clipped to solid white by Pillow's convert; I/F
    images of 8-bit values stay as they are."""
    a = _gray()
    paths = {"8bit.png": Image.fromarray(a),
             "16bit.png": Image.fromarray(a.astype(np.uint16) * 257),
             "16bit.pgm": Image.fromarray(a.astype(np.uint16) * 257),
             "int32.tif": Image.fromarray(a.astype(np.int32) * 257),
             "float01.tif": Image.fromarray(a.astype(np.float32) / 255),
             "float16range.tif": Image.fromarray(a.astype(np.float32) * 257),
             "int32_8bit.tif": Image.fromarray(a.astype(np.int32)),      # kept as they are
             "float_8bit.tif": Image.fromarray(a.astype(np.float32))}
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


# ----------------------------------------------------------------------------- eval geometry

@pytest.mark.parametrize("w, h, size, crop, resized, offsets", [
    # short side 353 -> 256, long int(500 * 256 / 353) = int(362.6) = 362 (natkit had 363)
    (500, 353, 224, 0.875, (362, 256), (69, 16)),
    (353, 500, 224, 0.875, (256, 362), (16, 69)),
    # long int(640 * 256 / 427) = int(383.7) = 383; left round(159 / 2) = 80 (floor: 79)
    (640, 427, 224, 0.875, (383, 256), (80, 16)),
    # crop 1: no resize of a square image; odd margins round half to even: round(2.5) = 2
    (224, 224, 224, 1.0, (224, 224), (0, 0)),
    (229, 100, 32, 1.0, (73, 32), (20, 0)),  # int(32 * 229 / 100) = 73, round(20.5) = 20
])
def test_eval_geometry_matches_torchvision(w, h, size, crop, resized, offsets):
    """torchvision Resize truncates the long side and CenterCrop rounds its offsets;
    natkit rounded the long side and floored the offsets."""
    assert D.eval_geometry(w, h, size, crop) == (resized, offsets)


def test_eval_transform_resizes_and_crops_like_torchvision():
    rgb = np.random.default_rng(3).integers(0, 256, (427, 640, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    pre = {"kind": "folder", "in_chans": 3, "img_size": 224, "crop_pct": 0.875,
           "mean": [0.0] * 3, "std": [1.0] * 3}
    expect = img.resize((383, 256), Image.BICUBIC).crop((80, 16, 304, 240))
    x = D.eval_transform(img, pre)
    assert torch.equal(x, torch.from_numpy(np.asarray(expect, np.float32) / 255).permute(2, 0, 1))


# ----------------------------------------------------------------------------- folders

def _save(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def test_hidden_folders_and_files_are_skipped(tmp_path):
    """``val/.ipynb_checkpoints`` was a class (an error when empty, else an extra class)."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            _save(str(tmp_path / split / c / "0.png"), _gray(h=8, w=8))
    (tmp_path / "val" / ".ipynb_checkpoints").mkdir()
    _save(str(tmp_path / "train" / ".ipynb_checkpoints" / "0.png"), _gray(h=8, w=8))
    _save(str(tmp_path / "train" / "a" / ".hidden" / "1.png"), _gray(h=8, w=8))
    _save(str(tmp_path / "train" / "a" / "._2.png"), _gray(h=8, w=8))  # macOS resource fork
    classes, samples = D.scan_folder(str(tmp_path / "train"))
    assert classes == ["a", "b"] and len(samples) == 2
    spec = D.make_data(str(tmp_path), img_size=8, workers=0)
    assert spec.classes == ["a", "b"] and len(spec.train) == 2 and len(spec.val) == 2


def test_data_digits_warns_when_a_digits_folder_exists(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert D.make_data("digits").name == "digits"
    assert "warning" not in capsys.readouterr().err
    (tmp_path / "digits").mkdir()
    assert D.make_data("digits").name == "digits"  # still the built-in set
    assert "--data ./digits" in capsys.readouterr().err


def _rgb(seed=0, h=52, w=60):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_channels_and_size_come_from_a_sample_of_the_folder(tmp_path, capsys):
    """They came from the first file: one small grayscale thumbnail sorting first turned an
    RGB 60x52 dataset into 1x32x32 training."""
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            for i in range(3):
                _save(str(tmp_path / split / c / f"{i + 1}.jpg"), _rgb(i))
    _save(str(tmp_path / "train" / "a" / "0.jpg"), _gray(h=12, w=12))
    spec = D.make_data(str(tmp_path), workers=0)
    assert (spec.in_chans, spec.img_size) == (3, 64)
    assert spec.train[0][0].shape == (3, 64, 64)  # the thumbnail, as RGB
    err = capsys.readouterr().err
    assert "1 of 10 sampled images are grayscale" in err and "using 3 channels" in err
    assert "range from 12 to 60 pixels: input size 64 from their median 60" in err
    spec = D.make_data(str(tmp_path), img_size=40, workers=0)  # --img-size wins, no warning
    assert (spec.in_chans, spec.img_size) == (3, 40)
    assert "range from" not in capsys.readouterr().err


def test_folder_sample_is_spread_over_the_classes(tmp_path, capsys):
    """A large first class of grayscale images no longer decides for a colour dataset."""
    for split in ("train", "val"):
        for i in range(40):
            _save(str(tmp_path / split / "a" / f"{i:02d}.png"), _gray(i, 8, 8))
            _save(str(tmp_path / split / "b" / f"{i:02d}.png"), _rgb(i, 8, 8))
    paths = [p for p, _ in D.scan_folder(str(tmp_path / "train"))[1]]
    assert D.inspect_images(paths) == (3, 32)
    assert "16 of 32 sampled images are grayscale" in capsys.readouterr().err
    assert D.inspect_images(paths[:40]) == (1, 32)  # all grayscale: no warning
    assert D.inspect_images(paths, in_chans=1, img_size=8) == (1, 8)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- predict / eval

@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """An official-style checkpoint (a bare state dict) of an untrained nat_micro (1x32x32,
    10 classes: --model nat_micro)."""
    from natkit.models import create_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("micro") / "micro.pth"
    torch.save(create_model("nat_micro").state_dict(), path)
    return str(path)


def _bad(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    return err


def test_predict_runs_in_batches_and_takes_folders(micro, tmp_path, monkeypatch, capsys):
    """predict decoded every image up front and ran them as one batch (1.1 GB peak RSS for
    64 images at 224 pixels); a folder was refused."""
    from natkit.cli import predict
    folder = tmp_path / "imgs"
    names = ["b.png", "a.png", "sub/c.png", "sub/d.jpg", "e.png"]
    for i, name in enumerate(names):
        _save(str(folder / name), _gray(i, 40, 36))
    _save(str(folder / ".hidden.png"), _gray(9))
    _save(str(folder / ".ipynb_checkpoints" / "x.png"), _gray(9))
    (folder / "notes.txt").write_text("not an image")
    seen, opened = [], []
    load, open_image = predict.load_for_inference, predict.open_image

    def spy_load(*args, **kwargs):
        model, meta = load(*args, **kwargs)
        model.register_forward_hook(lambda m, x, y: seen.append((len(x[0]), len(opened))))
        return model, meta

    monkeypatch.setattr(predict, "load_for_inference", spy_load)
    monkeypatch.setattr(predict, "open_image", lambda *a: opened.append(a) or open_image(*a))
    out = tmp_path / "p.json"
    base = ["predict", micro, "--model", "nat_micro", "--topk", "2"]
    assert main(base + [str(folder), "--batch-size", "2", "--json", str(out)]) == 0
    assert seen == [(1, 0), (2, 2), (2, 4), (1, 5)]  # the probe, then 3 batches read lazily
    expect = [str(folder / n) for n in sorted(["a.png", "b.png", "e.png", "sub/c.png",
                                                "sub/d.jpg"])]
    chunked = json.loads(out.read_text())
    assert [r["image"] for r in chunked] == expect
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == expect
    # one batch of all: the same predictions; files and folders mix
    assert main(base + [expect[0], str(folder / "sub"), "--json", str(out)]) == 0
    whole = json.loads(out.read_text())
    assert [r["image"] for r in whole] == [expect[0], *expect[3:]]
    for a, b in zip(whole, [chunked[0], *chunked[3:]]):
        assert [q["index"] for q in a["top"]] == [q["index"] for q in b["top"]]
        assert [q["prob"] for q in a["top"]] == pytest.approx([q["prob"] for q in b["top"]],
                                                              abs=1e-5)
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    _bad(capsys, base + [str(tmp_path / "empty")], "holds no image files")
    _bad(capsys, base + [str(tmp_path / "missing.png")], "does not exist")
    _bad(capsys, base + [expect[0], "--batch-size", "0"], "--batch-size must be >= 1, got 0")


def test_huge_img_size_and_tiny_crop_pct_fail_clearly(micro, tmp_path, capsys):
    """--crop-pct 0.0005 was a MemoryError traceback from PIL, --img-size 100000 an
    allocation RuntimeError traceback."""
    img = str(tmp_path / "val" / "0" / "0.png")
    for c in range(10):
        _save(str(tmp_path / "val" / str(c) / "0.png"), _gray(c, 8, 8))
    eval_ = ["eval", micro, "--model", "nat_micro", "--data", str(tmp_path), "--workers", "0",
             "--no-progress"]
    predict_ = ["predict", micro, "--model", "nat_micro", img]
    for argv in (eval_, predict_):
        _bad(capsys, argv + ["--img-size", "100000"], "--img-size must be at most 4096, got "
                                                      "100000")
        _bad(capsys, argv + ["--crop-pct", "0.0005"], "--crop-pct 0.0005 with input size 32 "
                                                      "would resize images to 64000 pixels")
        _bad(capsys, argv + ["--img-size", "4096", "--crop-pct", "0.4"],
             "use a larger --crop-pct or a smaller --img-size")
    assert main(predict_ + ["--crop-pct", "0.004"]) == 0  # 8000 pixels: allowed


def test_eval_transform_crops_the_center():
    from PIL import Image
    from natkit.cli.data import eval_transform
    import numpy as np
    arr = np.zeros((40, 40), dtype=np.uint8)
    arr[10:30, 10:30] = 255                     # a centered white square
    img = Image.fromarray(arr).convert("RGB")
    pre = {"kind": "folder", "img_size": 20, "crop_pct": 1.0, "mean": [0.0] * 3,
           "std": [1.0] * 3}
    pre["crop_pct"] = 0.5                        # resized to 40, center 20x20 = the square
    t = eval_transform(img, pre)
    assert t.shape == (3, 20, 20)
    assert t.min() > 0.9


def test_train_flip_is_horizontal():
    import numpy as np
    from PIL import Image
    from natkit.cli.data import train_transform
    arr = np.zeros((16, 16), dtype=np.uint8)
    arr[:, :8] = 255                              # left half white
    img = Image.fromarray(arr).convert("RGB")
    pre = {"kind": "folder", "img_size": 16, "min_crop_scale": 1.0, "hflip": 1.0,
           "mean": [0.0] * 3, "std": [1.0] * 3}
    torch.manual_seed(0)
    t = train_transform(img, pre)                  # the whole image, always flipped
    assert t[:, :, 8:].min() > 0.99 and t[:, :, :8].max() < 0.01
