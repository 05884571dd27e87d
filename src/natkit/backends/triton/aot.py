"""Compile the kernels for a GPU architecture without a GPU, and read ptxas's resource use.

Register spills are the cheapest large slowdown to introduce by accident (a 12x slower
forward once, from 4 KB of spills per thread) and need no GPU to detect: Triton lowers to
PTX on any machine and its wheel ships ``ptxas``. ``resources(kind, cfg, problem)``
compiles one kernel for ``sm_90a`` (H100) by default with the exact arguments the launcher
in ``op.py`` passes for ``problem`` (built from ``meta`` tensors) and Triton's own
specialization of them (integers equal to 1 become constants, multiples of 16 and tensor
pointers are marked 16-divisible, as in a real launch; this decides, for instance, whether
loads are vectorized and software-pipelined). It returns registers per thread, spill
bytes, shared memory, whether the loop's loads were pipelined, and the occupancy.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from . import configs, op
from .backward import na_bwd_dkdv_kernel, na_bwd_dq_kernel, na_bwd_drpb_kernel
from .forward import na_fwd_kernel

KERNELS = {"fwd": na_fwd_kernel, "dq": na_bwd_dq_kernel, "dkdv": na_bwd_dkdv_kernel,
           "drpb": na_bwd_drpb_kernel}
_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
            torch.int32: "*i32"}
# per-SM limits of sm_90
REGISTERS, MAX_WARPS, MAX_SHARED = 65536, 64, 227 * 1024


@dataclass(frozen=True)
class Problem:
    """One call's shapes: ``[batch, *spatial, heads, head_dim]`` queries."""

    spatial: tuple
    kernel: tuple
    batch: int = 2
    heads: int = 4
    kv_heads: Optional[int] = None
    head_dim: int = 32
    dilation: Optional[tuple] = None
    stride: Optional[tuple] = None
    causal: Optional[tuple] = None
    rpb: bool = False
    extra: int = 0
    dtype: torch.dtype = torch.bfloat16
    drpb_scheme: str = "fused"  # with rpb: whether the dQ kernel adds the rpb gradient
    deterministic: bool = False  # the dRPB kernel stores partial tiles instead of atomics


# representative problems per rank (what the static test and report compile)
REPRESENTATIVE = {1: Problem((1000,), (33,)), 2: Problem((56, 56), (7, 7)),
                  3: Problem((12, 20, 24), (3, 5, 7))}


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    num_warps: int
    pipelined: bool
    loop_instructions: int  # SASS instructions of one tile-loop iteration (masked path)
    loop_shared_stores: int = 0  # STS instructions in the tile loops

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def ctas_per_sm(self) -> int:
        """Resident programs per SM (registers are allocated per warp in units of 256)."""
        per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = REGISTERS // (per_warp * self.num_warps)
        return max(0, min(by_regs, MAX_WARPS // self.num_warps,
                          MAX_SHARED // max(self.shared, 1)))

    @property
    def warps_per_sm(self) -> int:
        return self.ctas_per_sm * self.num_warps


def launch_args(kind: str, cfg: configs.TileConfig, p: Problem) -> tuple:
    """The positional arguments ``op.py`` launches kernel ``kind`` with, on meta tensors."""
    nd = len(p.spatial)
    hk = p.kv_heads or p.heads

    def t(*shape, dtype=p.dtype):
        return torch.empty(shape, dtype=dtype, device="meta")
    q, out, dout, dq = (t(p.batch, *p.spatial, p.heads, p.head_dim) for _ in range(4))
    k, v, dk, dv = (t(p.batch, *p.spatial, hk, p.head_dim) for _ in range(4))
    lse, delta = (t(p.batch, *p.spatial, p.heads, dtype=torch.float32) for _ in range(2))
    rpb = t(p.heads, *(2 * x - 1 for x in p.kernel)) if p.rpb else None
    ek, ev = ((t(p.batch, p.extra, hk, p.head_dim), t(p.batch, p.extra, hk, p.head_dim))
              if p.extra else (None, None))
    g = op.geometry(q, p.kernel, p.dilation or (1,) * nd, p.stride or (1,) * nd,
                    p.causal or (False,) * nd)
    scale = p.head_dim ** -0.5
    if kind == "fwd":
        return op.fwd_args(q, k, v, out, lse, rpb, ek, ev, g, cfg, scale)[1]
    table = math.prod(2 * x - 1 for x in g.K)
    if kind == "dq":
        atomics = p.rpb and p.drpb_scheme == "fused"
        ncopy = min(64, op.dq_slots(g, cfg)) if atomics else 1
        drpb = t(ncopy, p.heads, table, dtype=torch.float32) if atomics else None
        return op.dq_args(q, k, v, dout, lse, delta, dq, rpb, drpb, ncopy, ek, ev, g, cfg,
                          scale)[1]
    if kind == "dkdv":
        return op.dkdv_args(q, k, v, dout, lse, delta, dk, dv, rpb, g, cfg, scale)[1]
    if kind == "drpb":
        if rpb is None:
            raise ValueError("the dRPB kernel needs a problem with rpb=True")
        layout = op.drpb_layout(g, cfg, p.batch, p.heads, SMS)
        drpb = (t(layout.programs * p.heads, cfg.block_m * cfg.block_n, dtype=torch.float32)
                if p.deterministic else t(layout.ncopy, p.heads, table, dtype=torch.float32))
        return op.drpb_args(q, k, v, dout, lse, delta, rpb, drpb, layout, g, cfg, scale,
                            p.deterministic)[1]
    raise ValueError(f"kind must be one of {tuple(KERNELS)}, got {kind!r}")


def compile_kernel(kind: str, cfg: configs.TileConfig, p: Problem, arch: int = 90):
    """``triton.compile`` of kernel ``kind`` for ``sm_<arch>``, specialized as a launch is."""
    fn = KERNELS[kind]
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1, which replaces "
                           "them with interpreted functions; compile in a process without it")
    args = launch_args(kind, cfg, p)
    assert len(args) == len(fn.arg_names), (kind, len(args), len(fn.arg_names))
    signature, constants, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        if i in fn.constexprs:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        else:
            ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
            if ty == "constexpr":
                signature[name], constants[name] = "constexpr", spec
            else:
                signature[name] = ty
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constants, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+(?:[^`]*`\()?(\.L_x_\d+)")


def _sass_body(sass: str) -> tuple[dict, list]:
    """``(labels, instructions)``: each label's position in the instruction list."""
    labels, body = {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(body)
            continue
        ins = _INSTRUCTION.match(line)
        if ins:
            body.append(ins.group(1))
    return labels, body


def _tile_loops(labels: dict, body: list) -> list[tuple[int, int]]:
    """``(start, end)`` of every backward branch's span that contains matrix instructions."""
    spans = []
    for end, ins in enumerate(body):
        branch = _BRANCH.search(ins)
        start = labels.get(branch.group(1), end + 1) if branch else end + 1
        if start <= end and any("MMA" in i for i in body[start:end + 1]):
            spans.append((start, end))
    return spans


def loop_instructions(sass: str) -> int:
    """Instructions executed by one iteration of the tile loop along its longest path.

    The tile loop is the largest backward branch's span that contains matrix instructions
    (HGMMA/HMMA). Within it, basic blocks (split at labels and after branches) are chained by
    their forward edges and the longest path is taken: the masked step, which runs the mask
    code that interior tiles skip, and only one copy of any code the compiler duplicated
    into both sides of a branch."""
    labels, body = _sass_body(sass)
    best = 0
    for start, end in _tile_loops(labels, body):
        # basic blocks of [start, end]: cut at labels inside and after every branch
        cuts = sorted({start, end + 1} | {i for i in labels.values() if start < i <= end}
                      | {i + 1 for i in range(start, end) if _BRANCH.search(body[i])})
        longest = {}  # block start -> longest path (instructions) from there to the loop end
        for lo, hi in reversed(list(zip(cuts, cuts[1:]))):
            last = body[hi - 1]
            target = _BRANCH.search(last)
            nexts = []
            if target is None or last.lstrip().startswith("@"):
                nexts.append(hi)  # falls through
            if target is not None and labels.get(target.group(1), -1) > hi - 1:
                nexts.append(labels[target.group(1)])  # forward branch inside the loop
            longest[lo] = (hi - lo) + max((longest.get(n, 0) for n in nexts if n <= end),
                                          default=0)
        best = max(best, longest[start])
    return best


def loop_shared_stores(sass: str) -> int:
    """Shared-memory stores (``STS``; not the pipeline's ``LDGSTS`` copies) inside the tile
    loops. In the forward kernel a few stage the probabilities for the second product (with
    8 warps); more are register-layout conversions through shared memory, which nothing
    there needs."""
    labels, body = _sass_body(sass)
    inside = {i for start, end in _tile_loops(labels, body) for i in range(start, end + 1)}
    return sum(1 for i in inside if re.match(r"(@!?U?P\w+\s+)?STS\b", body[i]))


def resources(kind: str, cfg: configs.TileConfig, p: Problem, arch: int = 90) -> Resources:
    """ptxas's resource use of kernel ``kind`` (one of ``KERNELS``) with ``cfg``.

    Registers and spills come from ``ptxas -v`` on Triton's PTX (Triton's own ptxas run does
    not report them without a GPU); the SASS is Triton's cubin, disassembled. Float32
    problems compile with the products ``torch.backends.cuda.matmul.allow_tf32`` asks for."""
    return _resources(kind, cfg, p, arch, torch.backends.cuda.matmul.allow_tf32)


@lru_cache(maxsize=None)
def _resources(kind: str, cfg: configs.TileConfig, p: Problem, arch: int,
               allow_tf32: bool) -> Resources:
    compiled = compile_kernel(kind, cfg, p, arch)
    ptx_text = compiled.asm["ptx"]
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(ptx, "w") as f:
            f.write(ptx_text)
        report = subprocess.run(
            [_tool("ptxas"), "-v", f"--gpu-name=sm_{arch}{suffix}", ptx, "-o", cubin],
            capture_output=True, text=True, check=True).stderr
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas report: {report!r}")
    return Resources(int(regs.group(1)), int(spills.group(1)), int(spills.group(2)),
                     int(compiled.metadata.shared), cfg.num_warps,
                     pipelined="cp.async" in ptx_text, loop_instructions=loop_instructions(sass),
                     loop_shared_stores=loop_shared_stores(sass))


# H100 SXM: 132 SMs, 4 warp schedulers each issuing one instruction per clock, ~1.755 GHz
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.755e9


def issue_bound_ms(res: Resources, tile_visits: int) -> float:
    """A lower bound on a kernel's time from instruction issue alone: every visited tile pair
    executes the loop body once per warp of its program, spread over all schedulers of all
    SMs. It ignores memory latency and bandwidth, the matrix and exp units' own limits, the
    prologue/epilogue and load imbalance, so a real time can only be larger."""
    cycles = tile_visits * res.loop_instructions * res.num_warps / (SMS * SCHEDULERS)
    return 1e3 * cycles / CLOCK_HZ


# dense tensor-core multiply-adds per SM per clock (sm_90): 16-bit inputs; TF32 runs at half
MMA_FLOPS_PER_CLOCK = {torch.bfloat16: 4096, torch.float16: 4096, torch.float32: 2048}
# matrix products per visited tile pair: forward S = QK^T, O += PV; dQ recomputes S and dP =
# dO V^T, then dQ += dS K; dK/dV recomputes both and adds dV += P^T dO, dK += dS^T Q; dRPB
# recomputes S and dP
DOTS = {"fwd": 2, "dq": 3, "dkdv": 4, "drpb": 2}


def mma_bound_ms(kind: str, cfg: configs.TileConfig, block_d: int, tile_visits: int,
                 dtype: torch.dtype = torch.bfloat16) -> float:
    """A lower bound on a kernel's time from its matrix products alone, at the tensor cores'
    dense peak (the padded head dim and every computed score count, attended or not;
    float32 assumes TF32). Together with ``issue_bound_ms`` it bounds a kernel from below:
    the two units overlap, so a kernel takes at least the larger."""
    flops = tile_visits * DOTS[kind] * 2 * cfg.block_m * cfg.block_n * block_d
    return 1e3 * flops / (SMS * MMA_FLOPS_PER_CLOCK[dtype] * CLOCK_HZ)


def default_report(ndim: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Resources of every kernel's default config (without and with RPB; the dRPB kernel only
    with, and in both its variants: atomics, and the partial tiles of deterministic mode)
    for the rank's representative problem at ``head_dim`` with ``dtype`` inputs (float32:
    with the products ``torch.backends.cuda.matmul.allow_tf32`` asks for). Rows with RPB
    also give the loop of the same config compiled without it (``*_without_rpb``): what the
    bias itself costs."""
    out = []
    for kind in configs.KINDS:
        for rpb, det in ((False, False), (True, False)) if kind != "drpb" else ((True, False),
                                                                             (True, True)):
            p = replace(REPRESENTATIVE[ndim], head_dim=head_dim, rpb=rpb, deterministic=det,
                        dtype=dtype)
            group_lengths = (1,) * (3 - ndim) + tuple(p.spatial)
            cfg = configs.candidates(ndim, configs.block_d(head_dim), group_lengths, kind, rpb,
                                     dtype=dtype)[0]
            res = resources(kind, cfg, p)
            row = dict(kind=kind, rpb=rpb, deterministic=det, config=repr(cfg),
                       registers=res.registers,
                       spill_bytes=res.spill_bytes, pipelined=res.pipelined,
                       shared=res.shared, ctas_per_sm=res.ctas_per_sm,
                       loop_instructions=res.loop_instructions,
                       loop_shared_stores=res.loop_shared_stores)
            if rpb and kind != "drpb":
                plain = resources(kind, cfg, replace(p, rpb=False))
                row.update(loop_instructions_without_rpb=plain.loop_instructions,
                           loop_shared_stores_without_rpb=plain.loop_shared_stores)
            out.append(row)
    return out


if __name__ == "__main__":  # python -m natkit.backends.triton.aot NDIM HEAD_DIM [DTYPE] -> JSON
    import json
    import sys
    dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.bfloat16
    for row in default_report(int(sys.argv[1]), int(sys.argv[2]), dtype):
        print(json.dumps(row))


__all__ = ["Problem", "Resources", "compile_kernel", "default_report", "issue_bound_ms",
           "launch_args", "loop_instructions", "loop_shared_stores", "mma_bound_ms", "resources"]
