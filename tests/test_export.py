"""Deployment paths: ``torch.export`` (keeps the fused op) and ONNX export (runs the portable
backend's plain ops), each run after export and compared with eager PyTorch."""

from __future__ import annotations

import re

import onnxruntime
import pytest
import torch

import natkit
from natkit.models import create_model


def _onnx_run(program, path, *inputs):
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(y) for y in session.run(None, feed)]


def test_torch_export_with_a_dynamic_batch_saves_loads_and_runs(tmp_path):
    model = create_model("nat_micro").eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(2, 1, 32, 32),),
                                  dynamic_shapes=({0: batch},))
    ops = {str(n.target) for n in program.graph.nodes}
    assert "natkit.cpu_na_forward.default" in ops  # the fused kernel, not a decomposition
    torch.export.save(program, tmp_path / "nat_micro.pt2")
    loaded = torch.export.load(tmp_path / "nat_micro.pt2").module()
    for b in (1, 5):
        x = torch.randn(b, 1, 32, 32)
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)


def test_onnx_export_of_a_model_with_a_dynamic_batch(tmp_path):
    model = create_model("nat_micro").eval()  # RPB, padding of small feature maps
    program = torch.onnx.export(model, (torch.randn(2, 1, 32, 32),), dynamo=True,
                                dynamic_shapes=({0: torch.export.Dim("batch")},),
                                verbose=False)
    for b in (1, 3):
        x = torch.randn(b, 1, 32, 32)
        (got,) = _onnx_run(program, tmp_path / "nat_micro.onnx", x)
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=0)


def test_jit_trace_of_a_model_checks_saves_loads_and_runs(tmp_path):
    """torch.jit.trace records the portable backend's ops (the fused custom ops cannot be
    traced): its own check, a second trace compared with the first, passes."""
    model = create_model("nat_micro").eval()
    traced = torch.jit.trace(model, torch.randn(2, 1, 32, 32))  # check_trace=True
    torch.jit.save(traced, str(tmp_path / "nat_micro.pt"))
    loaded = torch.jit.load(str(tmp_path / "nat_micro.pt"))
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)


def test_legacy_onnx_export_of_a_model_with_a_dynamic_batch(tmp_path):
    """The TorchScript-based exporter (``dynamo=False``) traces the portable backend too."""
    model = create_model("nat_micro").eval()
    path = tmp_path / "nat_micro.onnx"
    with pytest.warns(DeprecationWarning):  # PyTorch's, about this exporter
        torch.onnx.export(model, (torch.randn(2, 1, 32, 32),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 2, 3):
        x = torch.randn(b, 1, 32, 32)
        (got,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-5, rtol=0)


def test_jit_trace_over_several_chunks_runs_at_other_batch_sizes():
    """The portable backend computes its tiles in chunks (three at this size and batch);
    while tracing it sizes them per sample, so a trace recorded at batch 2 runs at 1 and 3."""
    def fn(q):
        return natkit.na2d(q, q, q, 7)
    traced = torch.jit.trace(fn, torch.randn(2, 56, 56, 2, 16))
    for b in (1, 3):
        x = torch.randn(b, 56, 56, 2, 16)
        torch.testing.assert_close(traced(x), fn(x), atol=1e-5, rtol=0)


def test_jit_trace_refuses_another_grid():
    """A trace's tiling is a constant: on another grid, even one of as many tokens, the
    traced graph raises instead of returning wrong values."""
    module = natkit.NeighborhoodAttention2D(16, 2, 5, dilation=2, rel_pos_bias=True).eval()
    traced = torch.jit.trace(module, torch.randn(1, 12, 13, 16))
    torch.testing.assert_close(traced(torch.randn(3, 12, 13, 16)).shape, (3, 12, 13, 16))
    with pytest.raises(RuntimeError, match="must match"):
        traced(torch.randn(1, 13, 12, 16))


class _EveryFeature(torch.nn.Module):
    def forward(self, q, k, v, ek, ev, rpb):
        out, lse = natkit.na3d(q, k, v, (3, 2, 3), dilation=(1, 2, 1), stride=(2, 1, 1),
                               is_causal=(True, False, False), additional_keys=ek,
                               additional_values=ev, return_lse=True)
        return out + natkit.na3d(q, k, v, 3, rpb=rpb), lse


def test_onnx_export_of_every_feature(tmp_path):
    q = torch.randn(2, 5, 6, 7, 4, 8)
    k, v = torch.randn(2, 2, 5, 6, 7, 2, 8).unbind(1)
    ek, ev = torch.randn(2, 2, 3, 2, 8).unbind(1)
    inputs = (q, k, v, ek, ev, torch.randn(4, 5, 5, 5))
    program = torch.onnx.export(_EveryFeature(), inputs, dynamo=True, verbose=False)
    got = _onnx_run(program, tmp_path / "features.onnx", *inputs)
    for a, b in zip(got, _EveryFeature()(*inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fused_backends_refuse_during_onnx_export(monkeypatch):
    """What makes ONNX export work: while it traces, automatic dispatch passes the fused
    custom ops over, and asking for one explicitly raises the reason."""
    import torch.onnx
    from natkit.backends import ONNX_REASON
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    q = torch.randn(1, 8, 2, 4)
    backend = natkit.backends.choose_backend(None, natkit._checks.check_inputs(
        1, q, q, q, 3, 1, 1, False, None, None, None, None), q, None, False)
    assert backend.name == "torch"
    reason = re.escape(f"backend='cpu' cannot run this call: {ONNX_REASON}")
    with pytest.raises(ValueError, match=reason):
        natkit.na1d(q, q, q, 3, backend="cpu")
