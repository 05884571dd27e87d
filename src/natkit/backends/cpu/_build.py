"""Compiles the fused CPU kernels at first use and caches them.

``torch.utils.cpp_extension.load_inline`` builds with the system C++ compiler into the torch
extensions directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``);
later processes load the cached library without compiling. The module name carries a hash
of the source, the flags, the torch version and the CPU's instruction-set flags, so a
changed kernel, another torch or a different CPU (``-march=native``) gets its own build
instead of a stale or illegal one.

Processes building at once (pytest-xdist workers, torchrun ranks) take turns on an
``fcntl`` lock in the build folder. The kernel drops it when its process dies, so a build
killed half-way (a CI timeout, a preempted rank) cannot block later processes, as the lock
file torch's builder leaves behind would (every later load waits on it forever): whoever
holds natkit's lock removes that file. A cache folder that cannot be written (a read-only
mount baked into an image) still serves a library built there before.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import threading
import time
from typing import Optional

try:
    import fcntl
except ImportError:  # not POSIX: torch's own lock file only
    fcntl = None

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
    import torch
    key = "\n".join([SOURCE, " ".join(CFLAGS), torch.__version__, _cpu_flags()]).encode()
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
        name = module_name()
        reason = missing_toolchain()
        library = _built_library(name) if reason is not None else None
        if reason is not None and library is None:
            _error = reason
            raise RuntimeError(reason)
        start = time.perf_counter()
        try:  # without a toolchain, a library built here before still serves
            _module = _build(name) if library is None else _import(name, library)
        except Exception as err:  # compiler errors, missing headers, unusable folders, ...
            _error = _reason(err)
            logger.warning("natkit: %s; automatic dispatch uses the portable backend "
                           "(slower)", _error)
            raise RuntimeError(_error) from err
        compile_seconds = time.perf_counter() - start
        return _module


def _paths(name: str) -> tuple[str, str]:
    """The build folder of ``name`` (created if missing: may raise ``OSError``) and the
    path of its library."""
    from torch.utils.cpp_extension import _get_build_directory
    folder = _get_build_directory(name, False)
    return folder, os.path.join(folder, name + ".so")


def _built_library(name: str) -> Optional[str]:
    """The cached library of ``name`` if there is one."""
    try:
        library = _paths(name)[1]
    except OSError:
        return None
    return library if os.path.exists(library) else None


def _build(name: str):
    from torch.utils.cpp_extension import load_inline
    folder, library = _paths(name)
    try:
        with _exclusive(folder):
            if not os.path.exists(library):
                logger.warning("natkit: compiling the fused CPU kernel (first use on this "
                               "machine, about 30 s; cached afterwards)")
            return load_inline(name, cpp_sources=[SOURCE], functions=FUNCTIONS,
                               extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False)
    except OSError:
        if not os.path.exists(library):
            raise
        return _import(name, library)  # a read-only cache with the library in it


@contextlib.contextmanager
def _exclusive(folder: str):
    """natkit's build lock on ``folder``; holding it, torch's lock file there is a dead
    build's (every natkit process builds under this lock) and is removed."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, "natkit.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError:  # a file system without locks (some network mounts): torch's
                pass
        if locked:
            stale = os.path.join(folder, "lock")
            if os.path.exists(stale):
                logger.warning("natkit: removing %s, left by a build that was killed", stale)
                os.remove(stale)
        yield
    finally:
        os.close(fd)  # releases the lock


def _import(name: str, library: str):
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reason(err: Exception) -> str:
    """One line on why the build failed: the compiler's error lines when there are any."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines()]
    errors = ([ln for ln in lines if re.search(r"\berror:", ln)]  # the compiler's own
              or [ln for ln in lines if "error" in ln.lower()])
    detail = " | ".join(ln[:200] for ln in errors[:3]) if errors else text[-400:]
    march = os.environ.get("NATKIT_CPU_MARCH")
    where = f" with NATKIT_CPU_MARCH={march!r} (-march={march})" if march else ""
    return f"compiling the fused CPU kernels{where} failed: {type(err).__name__}: {detail}"


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
