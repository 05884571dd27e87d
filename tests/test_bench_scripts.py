"""The benchmarks' pieces: the CPU timer's round-robin, case labels, and those of the GPU
benchmark that run without a GPU: FlexAttention's neighborhood mask (the Flex NA baseline)
against the reference, and ``benchmarks/bench_gpu.py --smoke`` end to end with the Triton
kernels in Triton's interpreter, so that the script works the first time a GPU is lent."""

from __future__ import annotations

import csv
import dataclasses
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from natkit.backends.reference import na_reference
from natkit.bench.flex import FlexNA
from natkit.bench.runner import Case
from natkit.bench.timing import time_each_ms
from sweep import make_inputs, params, random_config

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_timer_takes_repetitions_round_robin():
    """On the CPU every contender runs once per round (a burst of load hits all alike);
    one that raises is reported, not timed, and the others still are."""
    calls = []

    def contender(name):
        def fn():
            calls.append(name)
        return fn

    def broken():
        raise RuntimeError("out of memory")

    def fails_later():
        calls.append("c")
        if calls.count("c") > 3:
            raise ValueError("out of memory on the 4th call")
    times = time_each_ms([contender("a"), broken, fails_later, contender("b")], "cpu",
                         warmup=2, reps=3)
    assert calls == ["a", "a", "c", "c", "b", "b"] + ["a", "c", "b", "a", "c", "b", "a", "b"]
    assert isinstance(times[1], RuntimeError) and isinstance(times[2], ValueError)
    assert all(isinstance(t, float) and t >= 0 for t in (times[0], times[3]))


def test_case_labels_tell_dilation_apart():
    base = dict(name="x", batch=2, spatial=(20, 20), heads=4, head_dim=32, kernel=(5, 5))
    assert Case(**base).describe() == "2x20x20 h4 d32 k5x5"
    assert Case(**base, dilation=(1, 1)).describe() == "2x20x20 h4 d32 k5x5"
    assert Case(**base, dilation=(2, 2)).describe() == "2x20x20 h4 d32 k5x5 dil2x2"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("seed", range(18))
def test_flex_na_mask_and_bias_match_the_reference(seed):
    """Dilation, stride, causal, GQA, sizes that are not tile multiples (padded keys); RPB
    from seed 12 on (the first configs drawn with it)."""
    rng = random.Random(seed)
    c = random_config(rng, nd=seed % 3 + 1)
    while seed >= 12 and not c.rpb:
        c = random_config(rng, nd=seed % 3 + 1)
    c = dataclasses.replace(c, num_extra=0)  # not a FlexNA feature
    x = make_inputs(c, torch.float64, requires_grad=False)
    q, k, v, rpb = x["query"], x["key"], x["value"], x["rpb"]
    flex = FlexNA(c.spatial, c.kernel_size, c.dilation, c.stride, c.is_causal, rpb=rpb,
                  device="cpu", compile=False)
    tiled = [flex.to_tiled(t) for t in (q, k, v)]
    assert all(torch.equal(flex.from_tiled(t), orig) for t, orig in zip(tiled, (q, k, v)))
    got = flex.from_tiled(flex(*tiled))  # eager: unfused, fine at this size
    ref, _ = na_reference(q, k, v, params(c, x), rpb)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


def test_bench_gpu_smoke_runs_every_row(tmp_path):
    """Every row kind of the GPU benchmark (natkit autotuned, each rpb-gradient scheme forced,
    deterministic mode, Swin WSA, full attention; the correctness check; FLOP-bound columns
    of the b == 1 shapes) is produced, timed and checked, and the summary table printed."""
    env = dict(os.environ, TRITON_INTERPRET="1", NATKIT_TRITON_ON_CPU="1",
               PYTHONPATH=str(ROOT / "src"))
    out = tmp_path / "bench_gpu.csv"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke",
                          "--dtype", "float16", "--no-flex", "--csv", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    checks = [r for r in rows if r["pass_"] == "check"]
    assert [r["shape"] for r in checks] == ["smoke 2D", "smoke 2D"]  # b == 1 shapes: no check
    for r in checks:
        err = float(re.fullmatch(r"max\|diff\|=(\S+)", r["note"]).group(1))
        assert err < 5e-3, r
    timed = {(r["shape"], r["rpb"], r["pass_"], r["impl"]): r
             for r in rows if r["pass_"] != "check"}
    expected = {("smoke 2D", rpb, pas, impl)
                for rpb in ("False", "True") for pas in ("fwd", "fwd+bwd")
                for impl in ("natkit", "swin_wsa")}
    expected |= {("smoke 2D", "False", pas, "full_math") for pas in ("fwd", "fwd+bwd")}
    expected |= {("smoke 2D", rpb, "fwd+bwd", "natkit_deterministic") for rpb in ("False", "True")}
    expected |= {("smoke 2D", "True", "fwd+bwd", f"natkit_{s}") for s in ("fused", "separate")}
    expected |= {("smoke 1D", "False", pas, impl)
                 for pas in ("fwd", "fwd+bwd") for impl in ("natkit", "full_math")}
    expected |= {("smoke 3D", "False", "fwd", impl) for impl in ("natkit", "full_math")}
    assert set(timed) == expected
    for key, r in timed.items():
        assert float(r["ms"]) > 0, (key, r["note"])
    # the tile-work note names what ran: the forced schemes and deterministic mode's scheme
    assert "rpb gradient fused" in timed["smoke 2D", "True", "fwd+bwd", "natkit_fused"]["note"]
    for impl in ("natkit_separate", "natkit_deterministic"):
        assert "rpb gradient separate" in timed["smoke 2D", "True", "fwd+bwd", impl]["note"]
    summary = list(csv.DictReader((tmp_path / "bench_gpu_summary.csv").open()))
    assert len(summary) == 11
    for s in summary:
        assert float(s["natkit_ms"]) > 0 and float(s["full_speedup"]) > 0, s
        assert (s["vs_swin"] != "") == s["shape"].startswith("smoke 2D"), s
        assert (s["pct_bound"] != "") == (not s["shape"].startswith("smoke 2D")), s
    assert "| smoke 3D | no | fwd |" in res.stdout
