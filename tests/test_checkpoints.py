"""Checkpoint loading: the files people actually have (headless, detection backbones,
compiled / averaged models, timm and mmcv training checkpoints, transformers layouts) into
``create_model(pretrained=...)`` and into ``natkit eval``/``predict`` (``cli.loading``)."""

from __future__ import annotations

import argparse
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
    # a truncated file is still called what it may be
    (tmp_path / "cut.pth").write_bytes((tmp_path / "mmcv.pth").read_bytes()[:3000])
    with pytest.raises(ckpt_io.CheckpointError, match="corrupt, empty, truncated"):
        ckpt_io.read(str(tmp_path / "cut.pth"))


