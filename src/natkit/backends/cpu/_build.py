"""Compiles the fused CPU kernels at first use and caches them.

``torch.utils.cpp_extension.load_inline`` builds with the system C++ compiler into the torch
extensions directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``);
later processes load the cached library without compiling. The module name carries a hash
of the source, the flags and the CPU's instruction-set flags, so a changed kernel or a
different CPU (``-march=native``) gets its own build instead of a stale or illegal one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from typing import Optional

from ._source import FUNCTIONS, SOURCE

# NATKIT_CPU_MARCH overrides -march=native (e.g. x86-64-v3 for an AVX2 build on a shared
# cache used by different CPUs, or to test the 8-lane code path on an AVX-512 machine).
CFLAGS = ["-O3", "-march=" + os.environ.get("NATKIT_CPU_MARCH", "native"), "-fopenmp",
          "-std=c++20", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]

logger = logging.getLogger("natkit")
_lock = threading.Lock()
_module = None
_error: Optional[str] = None
compile_seconds: Optional[float] = None  # wall time of the build/load in this process


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + platform.processor()


def module_name() -> str:
    key = "\n".join([SOURCE, " ".join(CFLAGS), _cpu_flags()]).encode()
    return "natkit_cpu_" + hashlib.sha256(key).hexdigest()[:16]


def missing_toolchain() -> Optional[str]:
    """Why the kernels cannot be built here, or None."""
    from torch.utils.cpp_extension import is_ninja_available
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return (f"no C++ compiler found ({cxx!r} / 'g++' not on PATH); install one or use "
                f"backend='torch'")
    if not is_ninja_available():
        return "the 'ninja' build tool is missing (pip install ninja)"
    return None


def load():
    """The compiled extension module; raises RuntimeError (with the reason) if it cannot build."""
    global _module, _error, compile_seconds
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        reason = missing_toolchain()
        if reason is not None:
            _error = reason
            raise RuntimeError(reason)
        from torch.utils.cpp_extension import _get_build_directory, load_inline
        name = module_name()
        if not os.path.exists(os.path.join(_get_build_directory(name, False), name + ".so")):
            logger.warning("natkit: compiling the fused CPU kernel (first use on this machine, "
                           "about 30 s; cached afterwards)")
        start = time.perf_counter()
        try:
            _module = load_inline(name, cpp_sources=[SOURCE], functions=FUNCTIONS,
                                  extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False)
        except Exception as err:  # compiler errors, missing headers, ...
            _error = f"compiling the fused CPU kernels failed: {str(err).strip()[-500:]}"
            raise RuntimeError(_error) from err
        compile_seconds = time.perf_counter() - start
        return _module


def known_error() -> Optional[str]:
    """The build error met so far in this process, without trying to build."""
    return _error


def build_error() -> Optional[str]:
    """None if the kernels are (or can be) loaded, else the reason; builds on first call."""
    try:
        load()
    except RuntimeError as err:
        return str(err)
    return None
