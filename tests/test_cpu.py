"""The fused CPU backend vs the float64 reference: random sweep (forward, lse and every
gradient), half-precision inputs, thread-count independence, memory, dispatch, build cache.

The first test to run compiles the kernel (about 25 s on a 2-core machine; cached after).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading

import pytest
import torch

import natkit
from natkit._checks import check_inputs
from natkit.backends import choose_backend
from natkit.backends.reference import na_reference
from sweep import Config, assert_fa_close, grads, make_inputs, params, random_config

import natkit.backends.cpu as cpu_backend
from natkit.backends.cpu import _build

SWEEP = int(os.environ.get("NATKIT_SWEEP", "60"))

if _build.build_error() is not None:  # pragma: no cover - CI has a compiler
    pytest.fail(f"the fused CPU kernel does not build here: {_build.build_error()}",
                pytrace=False)


def cast(inputs, dtype):
    return {n: None if v is None else v.detach().to(dtype).requires_grad_()
            for n, v in inputs.items()}


def run_cpu(cfg: Config, inputs):
    return natkit.neighborhood_attention(
        inputs["query"], inputs["key"], inputs["value"], **cfg.kwargs(), rpb=inputs["rpb"],
        additional_keys=inputs["additional_keys"],
        additional_values=inputs["additional_values"], return_lse=True, backend="cpu")


def run_reference(cfg, inputs, upcast=True):
    return na_reference(inputs["query"], inputs["key"], inputs["value"], params(cfg, inputs),
                        inputs["rpb"], inputs["additional_keys"], inputs["additional_values"],
                        upcast=upcast)


def check_against_reference(cfg, dtype, seed, rel_floor):
    gen = torch.Generator().manual_seed(seed)
    inputs = cast(make_inputs(cfg, generator=gen), dtype)
    exact = cast(inputs, torch.float64)  # the same (rounded) inputs: FlashAttention's rule
    out, lse = run_cpu(cfg, inputs)
    assert out.dtype == dtype and out.shape == inputs["query"].shape
    assert lse.dtype == torch.float32 and lse.shape == inputs["query"].shape[:-1]
    ref, ref_lse = run_reference(cfg, exact)
    low_inputs = cast(inputs, dtype)
    low, low_lse = run_reference(cfg, low_inputs, upcast=False)
    assert_fa_close("out", out, ref, low, dtype, rel_floor, abs_floor=0)
    assert_fa_close("lse", lse, ref_lse, low_lse, torch.float32, rel_floor, abs_floor=0)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    got = grads(out, lse, inputs, g_out, g_lse)
    want = grads(ref, ref_lse, exact, g_out, g_lse)
    lowg = grads(low, low_lse, low_inputs, g_out, g_lse)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == dtype
        assert_fa_close(f"grad {name}", got[name], want[name], lowg[name], dtype, rel_floor,
                        abs_floor=0)


@pytest.mark.parametrize("seed", range(SWEEP))
def test_matches_reference_float32(seed):
    cfg = random_config(random.Random(seed), wide=True)
    check_against_reference(cfg, torch.float32, seed, rel_floor=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(max(4, SWEEP // 10)))
def test_half_precision_inputs(seed, dtype):
    """Half inputs are computed in float32: error at most twice the reference's own
    half-precision error plus a small floor."""
    cfg = random_config(random.Random(5000 + seed), wide=True)
    check_against_reference(cfg, dtype, seed, rel_floor=1e-4)


@pytest.mark.parametrize("seed", range(max(4, SWEEP // 3)))
def test_matches_reference_split_into_blocks(seed, monkeypatch):
    """Small (batch, kv_head) counts split each grid into row blocks (1-D: tile blocks);
    forced here on small inputs."""
    monkeypatch.setattr(cpu_backend, "MIN_BLOCK_TOKENS", 1)
    cfg = random_config(random.Random(9000 + seed), wide=True)
    p = params(cfg, make_inputs(cfg, generator=torch.Generator().manual_seed(0)))
    assert cpu_backend._blocks(p, _build.load().lanes()) > 1 or p.num_tokens < 2 * 16
    check_against_reference(cfg, torch.float32, seed, rel_floor=2e-5)


@pytest.mark.parametrize("seed", range(max(4, SWEEP // 3)))
def test_matches_reference_in_sub_blocks_of_one_row(seed, monkeypatch):
    """Each task works through sub-blocks with their own slabs (token indices relative to
    the slab's first token); forced here to one row (1-D: one SIMD tile) per sub-block, with
    row blocks too on half the seeds."""
    monkeypatch.setattr(cpu_backend, "SLAB_TOKENS", 1)
    monkeypatch.setattr(cpu_backend, "SLAB_REACHES", 0)
    if seed % 2:
        monkeypatch.setattr(cpu_backend, "MIN_BLOCK_TOKENS", 1)
    cfg = random_config(random.Random(11000 + seed), wide=True)
    p = params(cfg, make_inputs(cfg, generator=torch.Generator().manual_seed(0)))
    assert cpu_backend._sub_block_tokens(p) == 1
    check_against_reference(cfg, torch.float32, seed, rel_floor=2e-5)


@pytest.mark.parametrize("batch", [16, 1])  # one task per sequence; row blocks
def test_scratch_memory_is_bounded_by_the_sub_block(batch):
    """Long 1-D sequences, GQA groups of 4: the slabs hold a sub-block (or a task's smaller
    block) and its neighbors, not the sequence. With one torch thread the kernels run on the
    calling thread, a fresh one here, so its scratch is this call's."""
    n, heads, kv_heads, d, k = 16384, 4, 1, 16, 7
    q = torch.randn(batch, n, heads, d, requires_grad=True)
    kk, v = (torch.randn(batch, n, kv_heads, d, requires_grad=True) for _ in range(2))
    p = check_inputs(1, q, kk, v, k, 1, 1, False, None, None, None, None)
    seen = {}

    def run():
        natkit.na1d(q, kk, v, k, backend="cpu").sum().backward()
        seen["floats"] = _build.load().scratch_floats()

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(before)
    g = heads // kv_heads
    lanes = _build.load().lanes()
    margin = 4 * lanes + 3 * k
    span = cpu_backend._sub_block_tokens(p) + 2 * (k - 1) + margin  # tokens per slab plane
    # K, V, Q and dO of the group: d rows each; lse and delta: one row per head; accumulators
    bound = span * (d * (2 + 2 * g) + 2 * g) + 2 * d * lanes
    assert 0 < seen["floats"] <= bound, (seen["floats"], bound)
    assert bound * 3 < n * d * (2 + 2 * g)  # what slabs of the whole sequence would hold


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_large_tiles_and_long_rows(nd):
    """Rows much longer than the SIMD width (contiguous tiles in the interior), big kernel;
    big enough to be split into blocks with the default settings."""
    cfg = Config(spatial=((2100,), (19, 140), (5, 6, 81))[nd - 1],
                 kernel_size=((33,), (7, 9), (3, 5, 7))[nd - 1],
                 dilation=((2,), (2, 1), (1, 1, 3))[nd - 1], stride=(1,) * nd,
                 is_causal=(False,) * nd, rpb=True, batch=1, heads=2, kv_heads=1, head_dim=32,
                 num_extra=2)
    p = params(cfg, make_inputs(cfg, generator=torch.Generator().manual_seed(0)))
    assert cpu_backend._blocks(p, _build.load().lanes()) > 1
    check_against_reference(cfg, torch.float32, 7, rel_floor=2e-5)


@pytest.mark.parametrize("gqa", [False, True])
def test_strided_views_from_one_qkv_projection(gqa):
    """q, k, v unbound from one ``[..., 3, heads, head_dim]`` projection are read in place
    (strided); the result equals the one for contiguous copies, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 9, 23, 3, 4, 8, generator=gen)
    q, k, v = qkv.unbind(-3)
    if gqa:
        k, v = k[..., :2, :], v[..., :2, :]
    assert not q.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    outs, grads_ = [], []
    for args in (leaves, copies):
        out = natkit.na2d(*args, (3, 5), dilation=(2, 1), backend="cpu")
        outs.append(out)
        grads_.append(torch.autograd.grad(out.square().sum(), args))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads_):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_with_gradients():
    """The kernels are torch custom ops with fake versions: Dynamo traces them whole."""
    torch._dynamo.reset()
    natkit.available_backends()  # the registry imports backends lazily: not while tracing
    gen = torch.Generator().manual_seed(4)
    leaves = [torch.randn(2, 9, 10, 4, 8, generator=gen).requires_grad_() for _ in range(3)]
    rpb = torch.randn(4, 5, 5, generator=gen).requires_grad_()

    def fn(q, k, v, rpb):
        return natkit.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves, rpb)
    want = fn(*leaves, rpb)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    g1 = torch.autograd.grad(got.sum(), [*leaves, rpb])
    g2 = torch.autograd.grad(want.sum(), [*leaves, rpb])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_frozen_rpb_skips_its_gradient(monkeypatch):
    """A bias that needs no gradient is not accumulated in the backward kernel (its output
    is empty), and the other gradients match the reference, also compiled."""
    gen = torch.Generator().manual_seed(5)
    leaves = [torch.randn(2, 9, 10, 4, 8, generator=gen).requires_grad_() for _ in range(3)]
    rpb = torch.randn(4, 5, 5, generator=gen)
    want = torch.autograd.grad(natkit.na2d(*leaves, 3, rpb=rpb, backend="reference").square()
                               .sum(), leaves)
    drpb_sizes = []
    op = cpu_backend._backward_op
    monkeypatch.setattr(cpu_backend, "_backward_op",
                        lambda *a: (lambda g: drpb_sizes.append(g[3].numel()) or g)(op(*a)))

    def fn(q, k, v, rpb):
        return natkit.na2d(q, k, v, 3, rpb=rpb, backend="cpu")
    torch._dynamo.reset()
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        got = torch.autograd.grad(f(*leaves, rpb).square().sum(), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert drpb_sizes == [0, 0]


def test_thread_count_independence():
    """Each (batch, kv_head) task runs on one thread and nothing is reduced across
    threads in a schedule-dependent order, so 1 and 2 threads give identical bits."""
    cfg = Config(spatial=(33, 67), kernel_size=(5, 7), dilation=(1, 2), stride=(1, 2),
                 is_causal=(False, False), rpb=True, batch=2, heads=4, kv_heads=2, head_dim=16,
                 num_extra=2)  # 4 (batch, kv_head) pairs -> split into blocks
    gen = torch.Generator().manual_seed(0)
    exact = make_inputs(cfg, generator=gen)
    g_out = torch.randn(exact["query"].shape, generator=gen)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            inputs = cast(exact, torch.float32)
            out, lse = run_cpu(cfg, inputs)
            names = [n for n, v in inputs.items() if v is not None]
            got = torch.autograd.grad((out * g_out).sum() + lse.sum(), [inputs[n] for n in names])
            results.append([out, lse, *got])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_forward_allocates_no_score_tensor():
    """The forward allocates (through torch) only its output and log-sum-exp: no N x K
    scores or gathered keys. Measured with the profiler's memory accounting."""
    from torch.profiler import ProfilerActivity, profile
    b, n, h, d, k = 2, 4096, 2, 16, 31
    q, kk, v = (torch.randn(b, n, h, d) for _ in range(3))
    natkit.na1d(q, kk, v, k, backend="cpu")  # warm (build, tables)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        natkit.na1d(q, kk, v, k, backend="cpu")
    # top-level op: its memory figure includes everything allocated beneath it
    total = max(e.cpu_memory_usage for e in prof.events())
    out_bytes = q.numel() * 4 + b * n * h * 4
    assert total == out_bytes, (total, out_bytes)


@pytest.mark.parametrize("seed", range(6))
def test_flop_counter_counts_the_attended_pairs(seed):
    """torch.utils.flop_counter counts the fused ops' forward and backward as SDPA's
    convention does over the attended pairs (not 0, as for an unknown custom op)."""
    from sweep import counted_flops
    forward, backward, want_forward, want_backward = counted_flops(
        random_config(random.Random(6000 + seed)), "cpu")
    assert (forward, backward) == (want_forward, want_backward)


def test_chosen_automatically_for_cpu_float32_and_half():
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 10, 2, 8, dtype=dtype)
        p = check_inputs(1, q, q, q, 3, 1, 1, False, None, None, None, None)
        assert choose_backend(None, p, q, None, True).name == "cpu"


def test_float64_is_left_to_the_portable_backend():
    q = torch.randn(1, 10, 2, 8, dtype=torch.float64)
    p = check_inputs(1, q, q, q, 3, 1, 1, False, None, None, None, None)
    assert "float64" in cpu_backend.can_run(p, q, None, False)
    assert choose_backend(None, p, q, None, False).name == "torch"
    with pytest.raises(ValueError, match="backend='cpu' cannot run"):
        natkit.na1d(q, q, q, 3, backend="cpu")


def test_missing_compiler_is_refused_with_a_reason(monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CXX", "no-such-compiler")
    reason = _build.missing_toolchain()
    assert reason is not None and "compiler" in reason


def test_can_be_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("NATKIT_DISABLE_CPU_KERNEL", "1")
    q = torch.randn(1, 10, 2, 8)
    p = check_inputs(1, q, q, q, 3, 1, 1, False, None, None, None, None)
    assert "NATKIT_DISABLE_CPU_KERNEL" in cpu_backend.can_run(p, q, None, False)
    assert choose_backend(None, p, q, None, False).name == "torch"


def _load_in_subprocess(timeout=300, **env):
    code = ("import torch, natkit; from natkit.backends.cpu import _build;"
            " q = torch.randn(1, 9, 2, 8); natkit.na1d(q, q, q, 3);"
            " print(repr(_build.build_error()))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    return subprocess.run([sys.executable, "-c", code], env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_a_killed_build_does_not_block_later_processes():
    """torch's builder leaves its ``lock`` file behind when killed; every later load used to
    wait on it forever. natkit's own lock (dropped with its process) takes precedence."""
    from torch.utils.cpp_extension import _get_build_directory
    stale = os.path.join(_get_build_directory(_build.module_name(), False), "lock")
    open(stale, "w").close()
    try:
        r = _load_in_subprocess(timeout=120)
    finally:
        leftover = os.path.exists(stale)
        if leftover:
            os.remove(stale)
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
    assert not leftover and "left by a build that was killed" in r.stderr


def test_unusable_cache_folder_falls_back_with_the_reason(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = _load_in_subprocess(TORCH_EXTENSIONS_DIR=str(blocker / "cache"))
    assert r.returncode == 0, r.stderr  # the call ran (on the portable backend)
    assert "compiling the fused CPU kernels failed" in r.stdout and "NotADirectoryError" in r.stdout
    assert "automatic dispatch uses the portable backend" in r.stderr


def test_read_only_cache_serves_its_library(monkeypatch):
    def read_only(folder):
        raise PermissionError(30, "Read-only file system", os.path.join(folder, "natkit.lock"))
    monkeypatch.setattr(_build, "_exclusive", read_only)
    module = _build._build(_build.module_name())
    assert all(hasattr(module, name) for name in _build.FUNCTIONS)


def test_cached_library_serves_without_a_toolchain(monkeypatch):
    """A slim image with a baked cache and no compiler still runs the fused kernel."""
    monkeypatch.setattr(_build, "missing_toolchain", lambda: "no C++ compiler found")
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_error", None)
    module = _build.load()
    assert all(hasattr(module, name) for name in _build.FUNCTIONS)


def test_build_failure_reason_names_the_march_override(monkeypatch):
    monkeypatch.setenv("NATKIT_CPU_MARCH", "bogus-arch")
    command = "c++ -MMD -MF main.o.d -DTORCH_EXTENSION_NAME=natkit_cpu_x " + "-isystem /x " * 60
    err = RuntimeError(f"Error building extension 'natkit_cpu_x': [1/2] {command}"
                       f"-march=bogus-arch\n"
                       f"FAILED: main.o\n{command}-march=bogus-arch -c main.cpp -o main.o\n"
                       "cc1plus: error: bad value 'bogus-arch' for '-march=' switch\n"
                       "cc1plus: note: valid arguments are: nocona core2 " + "x " * 400)
    reason = _build._reason(err)
    assert "NATKIT_CPU_MARCH='bogus-arch'" in reason
    assert "bad value 'bogus-arch' for '-march=' switch" in reason
    assert "valid arguments" not in reason and len(reason) < 600


def test_second_process_uses_the_cached_build():
    code = ("import time, torch; from natkit.backends.cpu import _build; t = time.perf_counter();"
            " _build.load(); print(time.perf_counter() - t)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    seconds = float(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
    assert seconds < 10, f"loading the cached kernel took {seconds:.1f} s (recompiled?)"


def _reference(q, k, v, kernel, **kw):
    return natkit.neighborhood_attention(q, k, v, kernel, backend="reference", **kw)


def test_cpu_kernel_copies_views_it_cannot_stride_through():
    torch.manual_seed(0)
    base = torch.randn(2, 11, 16, 4, 16)
    q = base[:, :, 3:13, :, :8]            # spatial slice: rows are 16 tokens apart, not 10
    k = torch.randn(2, 11, 10, 4, 16)[..., ::2]   # tokens flatten, head_dim stride 2
    v = base[:, :, 4:14, :, 8:]
    for t in (q, k, v):
        t.requires_grad_()
    out = natkit.na2d(q, k, v, (3, 5), dilation=(2, 1), backend="cpu")
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    want = _reference(qc, kc, vc, (3, 5), dilation=(2, 1))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)),
                    torch.autograd.grad((want * g).sum(), (qc, kc, vc))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cpu_kernel_same_shape_different_stride():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 17, 2, 8) for _ in "qkv")
    for stride in (1, 2, 3, 1):
        torch.testing.assert_close(natkit.na1d(q, k, v, 5, stride=stride, backend="cpu"),
                                   _reference(q, k, v, 5, stride=stride), atol=1e-5, rtol=0)


def test_sub_block_tokens_are_bounded_by_the_grid():
    """At least SLAB_TOKENS and SLAB_REACHES neighborhood reaches, never more than the grid
    (the kernel reads it as a 32-bit int)."""
    q = torch.zeros(1, 300, 300, 1, 4)
    wide = check_inputs(2, q, q, q, 299, 1, 1, False, None, None, None, None)
    assert cpu_backend._sub_block_tokens(wide) == 300 * 300   # 8 reaches: 717,584
    small = check_inputs(2, q, q, q, 3, 1, 1, False, None, None, None, None)
    assert cpu_backend._sub_block_tokens(small) == 8 * (2 * 300 + 2)  # reach: 2 rows + 2
    line = torch.zeros(1, 5000, 1, 4)
    short = check_inputs(1, line, line, line, 3, 1, 1, False, None, None, None, None)
    assert cpu_backend._sub_block_tokens(short) == cpu_backend.SLAB_TOKENS
