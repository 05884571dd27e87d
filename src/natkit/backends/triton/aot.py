"""Compile the kernels for a GPU architecture without a GPU, and read ptxas's resource use.

Register spills are the cheapest large slowdown to introduce by accident (a 12x slower
forward once, from 4 KB of spills per thread) and need no GPU to detect: Triton lowers to
PTX on any machine and its wheel ships ``ptxas``. ``resources(kind, cfg, ...)`` compiles
one kernel for ``sm_90a`` (H100) by default and returns registers per thread, spill bytes,
shared memory and the resulting occupancy. Integer arguments are compiled unspecialized
(a real launch may specialize strides divisible by 16, which changes little).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .backward import na_bwd_dkdv_kernel, na_bwd_dq_kernel
from .configs import TileConfig, block_d
from .forward import na_fwd_kernel

KERNELS = {"fwd": na_fwd_kernel, "dq": na_bwd_dq_kernel, "dkdv": na_bwd_dkdv_kernel}
FP32_POINTERS = ("LSE", "DELTA", "DRPB")
# per-SM limits of sm_90
REGISTERS, MAX_WARPS, MAX_SHARED = 65536, 64, 227 * 1024


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    num_warps: int

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


def constexprs(kind: str, ndim: int, cfg: TileConfig, head_dim: int, has_rpb: bool,
               causal=(False, False, False), has_extra: bool = False,
               precision: str = "tf32") -> dict:
    """The compile-time arguments the launchers in ``op.py`` pass for this problem."""
    out = dict(C0=causal[0], C1=causal[1], C2=causal[2], ND=ndim,
               BQ0=cfg.q_tile[0], BQ1=cfg.q_tile[1], BQ2=cfg.q_tile[2],
               BK0=cfg.k_tile[0], BK1=cfg.k_tile[1], BK2=cfg.k_tile[2],
               HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), HAS_RPB=has_rpb, PRECISION=precision)
    if kind != "dkdv":
        out["HAS_EXTRA"] = has_extra
    return out


def compile_kernel(kind: str, consts: dict, num_warps: int, num_stages: int,
                   dtype: str = "bf16", arch: int = 90):
    """``triton.compile`` of kernel ``kind`` for ``sm_<arch>``; pointers before the first
    stride argument, fp32 for the log-sum-exp / delta / bias-gradient buffers."""
    fn = KERNELS[kind]
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1, which replaces "
                           "them with interpreted functions; compile in a process without it")
    names = fn.arg_names
    first_stride = next(i for i, n in enumerate(names) if n.startswith("s"))
    signature = {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
        elif i < first_stride:
            signature[name] = "*" + ("fp32" if name in FP32_POINTERS else dtype)
        elif name in ("qk_scale", "scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn, signature, {k: v for k, v in consts.items() if k in names})
    return triton.compile(src, target=GPUTarget("cuda", arch, 128),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@lru_cache(maxsize=None)
def _resources(kind, consts_items, num_warps, num_stages, dtype, arch) -> Resources:
    compiled = compile_kernel(kind, dict(consts_items), num_warps, num_stages, dtype, arch)
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name=sm_{arch}{suffix}", ptx, "-o",
             os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas report: {report!r}")
    return Resources(int(regs.group(1)), int(spills.group(1)), int(spills.group(2)),
                     int(compiled.metadata.shared), num_warps)


def resources(kind: str, cfg: TileConfig, ndim: int, head_dim: int = 32,
              has_rpb: bool = False, dtype: str = "bf16", arch: int = 90, **kw) -> Resources:
    """ptxas's resource use of kernel ``kind`` (``"fwd"``, ``"dq"``, ``"dkdv"``) with ``cfg``."""
    consts = constexprs(kind, ndim, cfg, head_dim, has_rpb, **kw)
    return _resources(kind, tuple(sorted(consts.items())), cfg.num_warps, cfg.num_stages,
                      dtype, arch)


def default_report(ndim: int, head_dim: int) -> list[dict]:
    """Resources of every kernel's default config (without and with RPB) at one rank and
    head dim, on a problem large enough that no tile is clamped."""
    from . import configs
    group_lengths = {1: (1, 1, 4096), 2: (1, 256, 256), 3: (64, 64, 64)}[ndim]
    out = []
    for kind in configs.KINDS:
        for rpb in (False, True):
            cfg = configs.candidates(ndim, configs.block_d(head_dim), group_lengths, kind, rpb)[0]
            res = resources(kind, cfg, ndim, head_dim, rpb)
            out.append(dict(kind=kind, rpb=rpb, config=repr(cfg), registers=res.registers,
                            spill_bytes=res.spill_stores + res.spill_loads))
    return out


if __name__ == "__main__":  # python -m natkit.backends.triton.aot NDIM HEAD_DIM -> JSON lines
    import json
    import sys
    for row in default_report(int(sys.argv[1]), int(sys.argv[2])):
        print(json.dumps(row))


__all__ = ["Resources", "compile_kernel", "constexprs", "default_report", "resources"]
