"""Checkpoint loading: the files people actually have (headless, detection backbones,
compiled / averaged models, timm and mmcv training checkpoints, transformers layouts) into
``create_model(pretrained=...)`` and into ``natkit eval``/``predict`` (``cli.loading``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from natkit.cli import checkpoint as ckpt_io
from natkit.cli.common import CLIError
from natkit.cli.loading import load_for_inference
from natkit.models import CheckpointMismatchError, create_model, load_checkpoint
from natkit.models.convert import to_hf_state_dict
from natkit.models.dinat import DiNAT

SMALL = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), drop_path_rate=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads would only add synchronization on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _equal(model, sd, keys=None) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], sd[k]) for k in (keys or sd))


# -- classifier: fine-tuning from a checkpoint without one ---------------------------------

def test_headless_checkpoint_fine_tunes_with_a_fresh_head(tmp_path):
    sd = create_model("nat_tiny", num_classes=0, **SMALL).state_dict()
    torch.save(sd, tmp_path / "headless.pth")
    with pytest.warns(UserWarning, match=r"it has no classifier; the model's \(num_classes=10\) "
                                         r"stays freshly initialized"):
        model = create_model("nat_tiny", pretrained=tmp_path / "headless.pth", num_classes=10,
                             **SMALL)
    assert model.head.weight.shape == (10, 64) and _equal(model, sd)
    # transformers' NatModel (no classifier, bare keys) likewise
    torch.save(to_hf_state_dict(sd, prefix=""), tmp_path / "natmodel.bin")
    with pytest.warns(UserWarning, match="it has no classifier"):
        model = create_model("nat_tiny", pretrained=tmp_path / "natmodel.bin", num_classes=10,
                             **SMALL)
    assert _equal(model, sd)
    # without num_classes the model's classifier must come from the checkpoint
    with pytest.raises(CheckpointMismatchError, match="missing keys .*head.weight"):
        create_model("nat_tiny", pretrained=tmp_path / "headless.pth", **SMALL)


def test_num_classes_0_drops_the_checkpoints_classifier_with_the_right_words(tmp_path):
    torch.save(create_model("nat_tiny", num_classes=7, **SMALL).state_dict(),
               tmp_path / "c7.pth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_model("nat_tiny", pretrained=tmp_path / "c7.pth", num_classes=0, **SMALL)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "its classifier is dropped (num_classes=0)" in messages[0]
    assert "freshly initialized" not in messages[0]


# -- backbones ------------------------------------------------------------------------------

def test_backbone_with_some_out_indices_loads_a_full_detection_backbone(tmp_path):
    full = create_model("nat_tiny", features_only=True, **SMALL).state_dict()
    det = {f"backbone.{k}": v + 1 for k, v in full.items()}
    det["decode_head.conv_seg.weight"] = torch.zeros(2)
    torch.save({"state_dict": det, "meta": {}}, tmp_path / "det.pth")
    model = create_model("nat_tiny", pretrained=tmp_path / "det.pth", features_only=True,
                         out_indices=(2, 3), **SMALL)
    assert all(torch.equal(v, det[f"backbone.{k}"]) for k, v in model.state_dict().items())
    assert not hasattr(model, "norm0")
    # still strict about everything else
    det["backbone.levels.0.blocks.0.attn.extra"] = torch.zeros(1)
    torch.save({"state_dict": det}, tmp_path / "det2.pth")
    with pytest.raises(CheckpointMismatchError, match="unexpected keys .*attn.extra"):
        create_model("nat_tiny", pretrained=tmp_path / "det2.pth", features_only=True,
                     out_indices=(2, 3), **SMALL)


# -- prefixes of wrappers -------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["compile", "ddp_compile", "compile_ddp", "averaged"])
def test_wrapped_model_state_dicts_load(tmp_path, wrap):
    src = create_model("nat_micro")
    sd = src.state_dict()
    saved = {
        "compile": lambda: torch.compile(src).state_dict(),
        "ddp_compile": lambda: {f"module._orig_mod.{k}": v for k, v in sd.items()},
        "compile_ddp": lambda: {f"_orig_mod.module.{k}": v for k, v in sd.items()},
        "averaged": lambda: torch.optim.swa_utils.AveragedModel(src).state_dict(),
    }[wrap]()
    assert any(k.startswith(("_orig_mod.", "module.")) for k in saved)
    torch.save(saved, tmp_path / "w.pth")
    assert _equal(create_model("nat_micro", pretrained=tmp_path / "w.pth"), sd)


# -- timm / mmcv training checkpoints, in the Python API and the CLI -------------------------

class _Foreign:
    """An arbitrary pickled object: loading it would run code from the file."""


class _Call:
    """Unpickles as a call: ``os.makedirs(path)``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os
        return os.makedirs, (self.path,)


def test_training_checkpoints_are_read_alike_by_the_api_and_the_cli(tmp_path):
    sd = create_model("nat_micro").state_dict()
    files = {
        "model_best.pth.tar": {"state_dict": sd, "epoch": 3, "arch": "nat_micro",
                               "args": argparse.Namespace(lr=1e-3, model="nat_micro")},
        "mmcv.pth": {"state_dict": sd, "meta": {"best_score": np.float64(0.5),
                                                "iter": np.int64(3), "dtype": np.dtype("f4"),
                                                "hist": np.arange(4.0)}},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        assert _equal(create_model("nat_micro", pretrained=tmp_path / name), sd)
        read = ckpt_io.read(str(tmp_path / name))
        assert torch.equal(read["state_dict"]["head.weight"], sd["head.weight"])
        model, info = load_for_inference(str(tmp_path / name), "nat_micro")
        assert info["official"] and _equal(model, sd)
    # other pickled objects: refused, and named as such (the file is not corrupt)
    torch.save({"state_dict": sd, "extra": _Foreign()}, tmp_path / "foreign.pth")
    with pytest.raises(ckpt_io.CheckpointError, match="holds pickled objects besides "
                                                      r"tensors \(.*_Foreign\)") as info:
        ckpt_io.read(str(tmp_path / "foreign.pth"))
    assert "corrupt" not in str(info.value)
    with pytest.raises(ValueError, match="pickled objects besides tensors"):
        create_model("nat_micro", pretrained=tmp_path / "foreign.pth")
    # numpy's allow-listed object arrays unpickle their items under the same rules
    marker = tmp_path / "ran"
    torch.save({"state_dict": sd, "meta": {"x": np.array([_Call(str(marker))], dtype=object)}},
               tmp_path / "call.pth")
    with pytest.raises(ckpt_io.CheckpointError, match=r"besides tensors \(os.makedirs\)"):
        ckpt_io.read(str(tmp_path / "call.pth"))
    assert not marker.exists()
    # a truncated file is still called what it may be
    (tmp_path / "cut.pth").write_bytes((tmp_path / "mmcv.pth").read_bytes()[:3000])
    with pytest.raises(ckpt_io.CheckpointError, match="corrupt, empty, truncated"):
        ckpt_io.read(str(tmp_path / "cut.pth"))


class _PointerDtype:   # a structured dtype whose state claims no object field ...
    def __init__(self, flags):
        self.flags = flags

    def __reduce__(self):
        return (np.dtype, ("V8", False, True),
                (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, self.flags))


class _PointerArray:   # ... over raw bytes numpy would take for an object pointer
    def __init__(self, flags):
        self.flags = flags

    def __reduce__(self):
        core = np._core if hasattr(np, "_core") else np.core
        return (core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (1,), _PointerDtype(self.flags), False, (0x4141414141414141).to_bytes(8,
                                                                                   "little")))


@pytest.mark.parametrize("flags", [0, 1])
def test_numpy_metadata_never_runs_numpys_code(tmp_path, flags):
    """A crafted numpy array in a checkpoint's metadata made numpy read file bytes as object
    pointers (a segfault on load: numpy's own code ran on the file's dtype state). numpy
    names resolve to inert stand-ins; the weights load. Run in a subprocess: a crash fails
    the test instead of the test run."""
    sd = create_model("nat_micro").state_dict()
    torch.save({"state_dict": sd, "meta": {"x": _PointerArray(flags)}}, tmp_path / "ptr.pth")
    code = ("import torch; from natkit.models.convert import read_state_dict; "
            f"sd = read_state_dict({str(tmp_path / 'ptr.pth')!r}); print(len(sd))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert run.returncode == 0, (run.returncode, run.stderr[-500:])
    assert run.stdout.strip() == str(len(sd))


# -- official checkpoints in eval / predict -------------------------------------------------

def test_cli_builds_the_checkpoints_model_at_the_given_size(tmp_path):
    """img_size reaches the model (DiNAT's dilations), and the class count comes from the
    checkpoint's classifier rather than the entrypoint's default."""
    with torch.device("meta"):
        shapes = create_model("dinat_mini", num_classes=3).state_dict()
    sd = {k: torch.randn(v.shape) for k, v in shapes.items()}
    torch.save({"model": sd}, tmp_path / "dinat_mini.pth")
    model, _ = load_for_inference(str(tmp_path / "dinat_mini.pth"), "dinat_mini", img_size=384)
    assert model.dilations == DiNAT.dilations_for(384, dict(depths=(3, 4, 6, 5),
                                                            kernel_size=7))
    assert model.dilations[0] == [1, 13, 1]   # 224 would give [1, 8, 1]
    assert model.pretrained_cfg["input_size"] == (3, 384, 384)
    assert model.head.out_features == 3 and _equal(model, sd)


def test_cli_takes_input_channels_from_the_checkpoint_and_refuses_another_kernel(tmp_path):
    rgb = create_model("nat_micro", in_chans=3).state_dict()   # nat_micro defaults to 1
    torch.save(rgb, tmp_path / "rgb.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # loaded exactly: no adaptation
        model, _ = load_for_inference(str(tmp_path / "rgb.pth"), "nat_micro")
    assert model.in_chans == 3 and _equal(model, rgb)
    torch.save(create_model("nat_micro", kernel_size=5).state_dict(), tmp_path / "k5.pth")
    with pytest.raises(CLIError, match="does not load into model 'nat_micro': kernel size 5 "
                                       "in the checkpoint, 3 in the model"):
        load_for_inference(str(tmp_path / "k5.pth"), "nat_micro")
    torch.save(create_model("nat_micro", num_classes=0).state_dict(), tmp_path / "headless.pth")
    with pytest.raises(CLIError, match=r"has no classifier \(head.weight\)"):
        load_for_inference(str(tmp_path / "headless.pth"), "nat_micro")


def test_adapt_false_refuses_kernel_and_channel_adaptations_and_warnings_name_kernels(
        tmp_path):
    k5 = create_model("nat_micro", kernel_size=5).state_dict()
    with pytest.warns(UserWarning, match=r"kernel size: kernel 5 -> 3$"):
        load_checkpoint(create_model("nat_micro"), k5)
    with pytest.raises(CheckpointMismatchError, match="kernel size 5 in the checkpoint, 3 in "
                                                      "the model; shape mismatches"):
        load_checkpoint(create_model("nat_micro"), k5, adapt=False)
    rgb = create_model("nat_micro", in_chans=3).state_dict()
    with pytest.raises(CheckpointMismatchError, match="3 input channels in the checkpoint, 1 "
                                                      "in the model"):
        load_checkpoint(create_model("nat_micro"), rgb, adapt=False)


def _natkit_checkpoint(path, sd):
    ckpt_io.save_atomic({ckpt_io.TAG: ckpt_io.FORMAT_VERSION, "model_name": "nat_micro",
                         "model_kwargs": {}, "model": sd, "classes": list("0123456789"),
                         "preprocess": {}}, str(path))


def test_cli_accepts_a_run_folder_and_reads_its_best_pt(tmp_path):
    last, best = (create_model("nat_micro").state_dict() for _ in range(2))
    run = tmp_path / "run"
    _natkit_checkpoint(run / "last.pt", last)
    model, _ = load_for_inference(str(run), None)
    assert _equal(model, last)
    _natkit_checkpoint(run / "best.pt", best)
    model, _ = load_for_inference(str(run), None)
    assert _equal(model, best)
    ema = create_model("nat_micro").state_dict()   # --ema: last.pt's EMA weights
    ckpt = ckpt_io.read(str(run / "last.pt"))
    ckpt_io.save_atomic({**ckpt, "ema": ema}, str(run / "last.pt"))
    model, _ = load_for_inference(str(run), None, use_ema=True)
    assert _equal(model, ema)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CLIError, match="is a folder without best.pt or last.pt"):
        load_for_inference(str(tmp_path / "empty"), None)
    with pytest.raises(ckpt_io.CheckpointError, match="is a folder; name the checkpoint file"):
        ckpt_io.read(str(run))


def test_eval_and_predict_build_the_model_at_img_size(tmp_path, monkeypatch):
    """``--img-size`` reaches the model that eval and predict build for an official-layout
    checkpoint (not only the preprocessing)."""
    from PIL import Image
    from natkit.cli import evaluate, main, predict
    built = []

    def spy(*args, **kwargs):
        model, meta = load_for_inference(*args, **kwargs)
        built.append(model.pretrained_cfg["input_size"])
        return model, meta

    for module in (evaluate, predict):
        monkeypatch.setattr(module, "load_for_inference", spy)
    ckpt = str(tmp_path / "micro.pth")
    torch.save(create_model("nat_micro").state_dict(), ckpt)
    Image.new("L", (40, 40), 128).save(tmp_path / "x.png")
    assert main(["predict", ckpt, str(tmp_path / "x.png"), "--model", "nat_micro",
                 "--img-size", "48"]) == 0
    main(["eval", ckpt, "--model", "nat_micro", "--img-size", "40", "--data",
          str(tmp_path / "no-such-folder")])  # fails on the data, after building the model
    assert built == [(1, 48, 48), (1, 40, 40)]
