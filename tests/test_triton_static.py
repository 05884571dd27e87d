"""The Triton kernels' default configs compile for an H100 (sm_90a) without register spills.

No GPU needed: Triton lowers to PTX on any machine and its wheel ships ``ptxas``, whose
report gives registers and spill bytes (``natkit.backends.triton.aot``). A spilling default
was once a 12x slower forward; this catches the next one when a kernel or the config table
changes. Head dim 256 gets a small bound instead of zero (its 3-D dK/dV default, holding two
``[keys, 256]`` fp32 accumulators, spills 28 bytes). The loads of the tile loop must be
software-pipelined wherever the config asks for more than one stage. Float32 defaults (16-
bit tiles' bytes doubled) must fit in shared memory.

The compiles run in subprocesses without ``TRITON_INTERPRET`` (which the test session sets),
one per rank, in parallel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAD_DIMS = (32, 64, 128, 256)


def _compile_env() -> dict:
    """The environment for compiling subprocesses: the test session's, minus the interpreter."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def reports():
    code = ("import json, sys, torch\nfrom natkit.backends.triton.aot import default_report\n"
            "torch.backends.cuda.matmul.allow_tf32 = True\n"  # TF32: the most shared memory
            "for dtype in (torch.bfloat16, torch.float32):\n"
            "    for d in %r:\n"
            "        for row in default_report(int(sys.argv[1]), d, dtype):\n"
            "            print(json.dumps(dict(row, head_dim=d, dtype=str(dtype))))\n"
            % (HEAD_DIMS,))
    procs = {nd: subprocess.Popen([sys.executable, "-c", code, str(nd)], env=_compile_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for nd in (1, 2, 3)}
    out = {}
    for nd, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        out[nd] = [json.loads(line) for line in stdout.splitlines()]
    return out


@pytest.fixture(scope="module")
def bf16_reports(reports):
    return {nd: [r for r in rows if r["dtype"] == "torch.bfloat16"] for nd, rows in reports.items()}


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_float32_defaults_fit_in_shared_memory(reports, ndim):
    """Float32 tiles take twice the bytes: every float32 default must still launch on an
    H100 (227 KB of shared memory per program), as it runs untuned (deterministic mode,
    ``NATKIT_TRITON_AUTOTUNE=0``). The forward's 16-bit default at head dims 65-128 needs
    320 KB as float32 with TF32 (``configs._TABLE_F32``). Spills are not checked: float32
    without TF32 lowers the products to FMA loops that spill (README)."""
    rows = [r for r in reports[ndim] if r["dtype"] == "torch.float32"]
    assert len(rows) == len(HEAD_DIMS) * (3 * 2 + 2)
    too_big = [(r["kind"], r["rpb"], r["head_dim"], r["shared"]) for r in rows
               if r["ctas_per_sm"] < 1]
    assert not too_big, f"float32 defaults over 227 KB of shared memory: {too_big}"


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_defaults_do_not_spill(bf16_reports, ndim):
    rows = bf16_reports[ndim]
    # every head dim: fwd, dQ, dK/dV with and without RPB, and the dRPB kernel's two variants
    assert len(rows) == len(HEAD_DIMS) * (3 * 2 + 2)
    bad = [r for r in rows if r["spill_bytes"] > (0 if r["head_dim"] <= 128 else 64)]
    assert not bad, f"spilling default configs: {bad}"
    assert all(0 < r["registers"] <= 255 for r in rows)
    # the SASS parser found the tile loop (the issue-bound estimates rest on it)
    assert all(r["loop_instructions"] > 100 for r in rows), rows
    # fits on an SM at all (shared memory <= 227 KB with its pipeline buffers)
    assert all(r["ctas_per_sm"] >= 1 for r in rows), [r for r in rows if r["ctas_per_sm"] < 1]
    # the tile loop's loads are software-pipelined (cp.async) wherever num_stages asks for it
    unpipelined = [r for r in rows if "num_stages=1" not in r["config"] and not r["pipelined"]]
    assert not unpipelined, f"defaults whose loads are not pipelined: {unpipelined}"


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_forward_bias_stays_in_the_scores_layout(bf16_reports, ndim):
    """RPB costs the forward its gather, not a detour through shared memory. The bias was
    once gathered inside the masked/unmasked branch, got a register layout of its own and
    the scores were converted to it through shared memory: the loop grew 1.7-2.3x over the
    same config without RPB and gained 10-11 shared stores. Gathered before the product it
    costs 1.2-1.5x and 1-4 stores (a P tile staged for the second product)."""
    rows = [r for r in bf16_reports[ndim]
            if r["kind"] == "fwd" and r["rpb"] and r["head_dim"] <= 128]
    assert len(rows) == 3
    for r in rows:
        assert r["loop_instructions"] <= 1.6 * r["loop_instructions_without_rpb"], r
        assert r["loop_shared_stores"] <= r["loop_shared_stores_without_rpb"] + 4, r


def test_resources_reports_spills():
    """A config known to spill heavily is reported as spilling (the check can fail)."""
    code = ("from natkit.backends.triton import aot, configs\n"
            "r = aot.resources('dkdv', configs.TileConfig((1, 8, 16), (1, 8, 8), 4, 2),\n"
            "                  aot.Problem((56, 56), (7, 7), head_dim=256))\n"
            "print(r.registers, r.spill_stores, r.ctas_per_sm, r.warps_per_sm)\n")
    out = subprocess.run([sys.executable, "-c", code], env=_compile_env(), capture_output=True,
                         text=True, check=True).stdout.split()
    regs, spills, ctas, warps = map(int, out)
    assert regs == 255 and spills > 1024 and warps == 4 * ctas


def test_compile_refuses_interpreted_kernels():
    from natkit.backends.triton import aot, configs
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.resources("fwd", configs.TileConfig((1, 1, 16), (1, 1, 16)), aot.Problem((64,), (3,)))


def test_loop_instructions_takes_the_longest_path():
    """One iteration = the longest path through the loop's blocks; code duplicated into both
    sides of a branch counts once, and a loop without matrix instructions is not the tile
    loop."""
    from natkit.backends.triton.aot import loop_instructions
    lines = [".L_x_0:", "IADD3 R1, R1, 0x1", "@P2 BRA `(.L_x_0)",  # a loop without MMA
             ".L_x_1:", "HGMMA.64x64x16 R0, gdesc[UR4], R0", "@P0 BRA `(.L_x_3)",
             "FADD R2, R2, R3", "FADD R2, R2, R3", "FSEL R2, R2, RZ, P1", "BRA `(.L_x_4)",
             ".L_x_3:", "FADD R2, R2, R3",
             ".L_x_4:", "FMUL R4, R2, R2", "@P1 BRA `(.L_x_1)", "EXIT"]
    sass, addr = [], 0
    for line in lines:
        if line.startswith(".L"):
            sass.append(line)
        else:
            sass.append(f"        /*{addr:04x}*/                   {line} ;")
            addr += 16
    # HGMMA, BRA, 3 on the long side, BRA, FMUL, BRA: 8 (the span holds 9)
    assert loop_instructions("\n".join(sass)) == 8


def test_loop_shared_stores_counts_sts_inside_tile_loops_only():
    from natkit.backends.triton.aot import loop_shared_stores
    lines = ["STS.128 [R1], R4", ".L_x_1:", "HGMMA.64x64x16 R0, gdesc[UR4], R0",
             "STS.128 [R2+0x4000], R8", "@P1 STS [R3], R9", "LDGSTS.E.64 [R4], desc[UR4][R6.64]",
             "@P1 BRA `(.L_x_1)", "STS.64 [R5], R8", "EXIT"]
    sass = "\n".join(line if line.startswith(".L") else
                     f"        /*{16 * i:04x}*/                   {line} ;"
                     for i, line in enumerate(lines))
    assert loop_shared_stores(sass) == 2


def test_mma_bound_is_the_dense_tensor_core_peak():
    """128x128 tiles at head dim 128: 2 products of 2*128^3 FLOPs per visited pair (forward),
    3 for dQ, 4 for dK/dV; at 132 SMs x 4096 FLOP/clock x 1.755 GHz (949 TFLOP/s, bf16)."""
    import torch
    from natkit.backends.triton import aot, configs
    cfg = configs.TileConfig((1, 8, 16), (1, 8, 16), 8, 2)
    visits = 132 * 1000
    fwd = aot.mma_bound_ms("fwd", cfg, 128, visits)
    assert fwd == pytest.approx(1e3 * visits * 2 * 2 * 128 ** 3 / 949.0e12, rel=1e-3)
    assert aot.mma_bound_ms("dq", cfg, 128, visits) == pytest.approx(1.5 * fwd)
    assert aot.mma_bound_ms("dkdv", cfg, 128, visits) == pytest.approx(2 * fwd)
    assert aot.mma_bound_ms("fwd", cfg, 128, visits, torch.float32) == pytest.approx(2 * fwd)
