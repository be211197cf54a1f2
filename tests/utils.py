"""The one tolerance policy of the test suite, and helpers shared by the tests.

Attention-like kernels are judged the way flash-attention's tests judge them: against an fp64
oracle, the kernel's error may be at most ``k`` times the error that PyTorch's own kernel makes
in the same dtype on the same inputs (plus a small floor for exact-ish cases). Plain elementwise
results use the dtype table (TransformerEngine-style).
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.multiprocessing as mp

# rtol/atol per dtype for elementwise comparisons against a higher-precision oracle.
DTYPE_TOLS: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-9},
    torch.float32: {"rtol": 1.3e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}

# Attention error multiplier against PyTorch's own kernel in the same dtype.
ATTN_ERROR_FACTOR = 2.0
# Floor for the allowed error, per dtype (PyTorch's own error can be ~0 for tiny problems).
ATTN_ERROR_FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-4,
                    torch.bfloat16: 2e-3}


def dtype_tols(dtype: torch.dtype) -> dict[str, float]:
    return DTYPE_TOLS[dtype]


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp64."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def oracle_attention(q, k, v, scale=None, key_mask=None):
    """fp64 attention oracle (out in fp64, LSE in fp64)."""
    from xdit_ops.reference import attention_ref

    return attention_ref(q.double(), k.double(), v.double(), scale=scale, key_mask=key_mask)


def torch_attention(q, k, v, scale=None):
    """PyTorch's own SDPA in the inputs' dtype (the error yardstick), BSHD in and out."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2)


def assert_attention_close(out, ref, yardstick, *, factor=ATTN_ERROR_FACTOR, what="attention"):
    """``out`` may be at most ``factor`` x as far from ``ref`` (fp64) as ``yardstick`` is."""
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = max_abs_err(out, ref)
    base = max_abs_err(yardstick, ref)
    allowed = factor * base + ATTN_ERROR_FLOOR[out.dtype]
    assert err <= allowed, (
        f"{what}: max error {err:.3e} exceeds {factor} x PyTorch's {base:.3e} "
        f"(+ floor {ATTN_ERROR_FLOOR[out.dtype]:.1e})"
    )


def assert_lse_close(lse, ref_lse, dtype, what="lse"):
    """LSEs are fp32 regardless of input dtype; their error tracks the scores' dtype."""
    assert lse.dtype == torch.float32, f"{what}: dtype {lse.dtype}, expected float32"
    assert lse.shape == ref_lse.shape, f"{what}: shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    atol = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{what}: -inf pattern differs"
    err = max_abs_err(lse[finite], ref_lse[finite])
    assert err <= atol[dtype], f"{what}: max error {err:.3e} > {atol[dtype]:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """NaN-fill a buffer before a kernel writes it, so unwritten elements show."""
    return t.fill_(float("nan"))


def replay_copy2d(descs) -> None:
    """Run ``copy2d`` descriptors (dst, dst_pitch, src, src_pitch, width, height) on host
    memory, byte by byte per row (``cudaMemcpy2D``'s meaning): the CPU check of descriptor and
    template arithmetic."""
    for i in range(0, len(descs), 6):
        dst, dp, src, sp, w, rows = descs[i:i + 6]
        for row in range(rows):
            ctypes.memmove(dst + row * dp, src + row * sp, w)


def randn(*shape, dtype=torch.float32, device="cpu", seed=None, scale=1.0):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else torch.seed() % (2**31))
    return (torch.randn(*shape, generator=g, dtype=torch.float32) * scale).to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# Distributed test harness: spawn N workers (gloo on CPU, or NCCL with one process per GPU),
# assert every exit, time out instead of hanging.

# NVLink multicast stays off on the shared GPU machines (GPU.md); every worker gets these.
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
BACKENDS = ("gloo", "nccl")
ERROR_GRACE_S = 20.0  # after a rank fails, how long the others may still run (and report)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple,
            errq, timeout: float) -> None:
    # A hung rank prints every thread's stack shortly before the parent kills it, so a hang
    # names the line it waits on (seen in the test report's captured stderr).
    faulthandler.dump_traceback_later(max(1.0, timeout - 10.0), exit=False)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        XDIT_TEST_BACKEND=backend,
        **NO_MULTICAST_ENV,
    )
    if backend == "gloo":
        # CPU workers see no GPU, so code that picks "cuda when available" (init_parallel's
        # default) runs the same CPU path here and on a GPU machine. Nothing has initialised
        # CUDA in this fresh spawned process yet, so hiding the devices still takes effect.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        fn(rank, world, *args)
        if dist.is_initialized():
            # Leave together: a rank tearing down its gloo pairs while a peer still talks to it
            # was seen to abort the peer at exit.
            dist.barrier()
    except BaseException:  # report every failure, including assertion errors, to the parent
        errq.put((rank, traceback.format_exc()))
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # fn passed and the group is torn down. Skip the interpreter's own teardown: in CI a gloo
    # worker aborted there once in ~200 spawns ("terminate called without an active exception",
    # exit code -6) after its test had passed; the exit code must report the test, not that.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn_group(fn: Callable, world: int, args: tuple, timeout: float, backend: str):
    """One spawn of ``world`` workers on a fresh port: (processes, errors, hung ranks)."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, backend, fn, args, errq, timeout),
                    daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    errors: list = []
    first_error = None
    # Wait for the group; once a rank has failed, the others get ERROR_GRACE_S to report their
    # own errors and are then killed: a peer of a failed rank usually waits in a collective
    # that will never complete (run 31 waited out a 190 s timeout per world size).
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        while not errq.empty():
            errors.append(errq.get())
        if errors:
            first_error = first_error or time.monotonic()
            if (any("EADDRINUSE" in tb for _, tb in errors)
                    or time.monotonic() - first_error > ERROR_GRACE_S):
                break
        time.sleep(0.05)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    while not errq.empty():
        errors.append(errq.get())
    return procs, errors, hung


def run_distributed(
    fn: Callable, world: int, *args, timeout: float = 240.0, backend: str = "gloo"
) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; fail on any error or timeout.

    Parameters
    ----------
    fn : a module-level function (it is pickled into spawned processes). It initialises the
        process group itself (e.g. ``xdit_ops.init_parallel``); ``RANK``, ``WORLD_SIZE``,
        ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` and ``XDIT_TEST_BACKEND`` are set.
    world : number of processes.
    timeout : seconds for the whole group; ranks still running then are killed and the test fails.
    backend : ``"gloo"`` (default): CPU workers with every GPU hidden. ``"nccl"``: one process
        per GPU, rank ``r`` on ``cuda:r`` (``torch.cuda.set_device(r)`` before ``fn``); skips the
        test when fewer than ``world`` GPUs are visible.
    """
    if backend not in BACKENDS:
        raise ValueError(f"run_distributed: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "nccl":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < world:
            pytest.skip(f"run_distributed: nccl with {world} ranks needs {world} GPUs, have {have}")
    for attempt in (1, 2):
        procs, errors, hung = _spawn_group(fn, world, args, timeout, backend)
        # The port picked for the rendezvous can be taken between free_port() and rank 0's
        # listen (run 30: EADDRINUSE, a GPU test whose code never ran); that alone, and only
        # once, is retried on a new port. Any other failure fails the test.
        if attempt == 1 and errors and all("EADDRINUSE" in tb for _, tb in errors):
            continue
        break
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors))
        pytest.fail(f"distributed test failed on {len(errors)} rank(s):\n{msg}")
    if hung:
        pytest.fail(f"distributed test timed out after {timeout}s; ranks still running: {hung}")
    codes = [p.exitcode for p in procs]
    assert all(c == 0 for c in codes), f"worker exit codes {codes}"


# ---------------------------------------------------------------------------------------------
# Triton's CPU interpreter (TRITON_INTERPRET=1 is read when triton is imported: a subprocess)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What every interpreter script starts with: torch, the interpreter's own fp32 -> e4m3 cast
# (``icast``: it rounds unlike the GPU's cvt.rn, so emulations compared with the interpreter
# take it) and the check that the interpreter is on.
TRITON_INTERPRETER_PRELUDE = textwrap.dedent("""
    import numpy as np
    import torch
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import _convert_float

    from xdit_ops.triton.fp8_attention import INTERPRET

    assert INTERPRET
    torch.set_num_threads(1)

    def icast(x):
        c = _convert_float(x.float().contiguous().numpy(), tl.float32, tl.float8e4nv,
                           ir.ROUNDING_MODE.RTNE)
        return torch.from_numpy(c.astype(np.uint8)).view(torch.float8_e4m3fn)
""")


def run_in_triton_interpreter(script: str, done: str) -> str:
    """Runs TRITON_INTERPRETER_PRELUDE + ``script`` under TRITON_INTERPRET=1 in a fresh process
    from the repository root (scripts may import ``tests``), without
    XDIT_OPS_FP8_TRITON_CONFIG; it must exit 0 and print ``done``. Returns its stdout."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("XDIT_OPS_FP8_TRITON_CONFIG", None)
    res = subprocess.run([sys.executable, "-c", TRITON_INTERPRETER_PRELUDE + script], env=env,
                         capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert res.returncode == 0 and done in res.stdout, res.stdout + res.stderr
    return res.stdout


def capture_cuda_graph(call: Callable):
    """Warm ``call()`` up on a side stream (torch's capture rules), then capture one call:
    returns (the graph, what the captured call returned)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = call()
    return g, out


def assert_cuda_graph_replays(call: Callable, inputs: tuple, fresh: tuple) -> None:
    """CUDA-graph capture and replay of ``call()`` equals its eager result, also after new
    values (``fresh``, one tensor per tensor of ``inputs``) are copied into ``inputs`` in place.

    Warms up on a side stream as torch's capture rules ask, captures one call, poisons the
    captured output with NaN, replays and compares bit for bit; then copies ``fresh`` in,
    replays, and checks the replay equals a new eager call that differs from the first.
    """
    eager = call()
    g, out = capture_cuda_graph(call)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), max_abs_err(out, eager)
    for t, x in zip(inputs, fresh, strict=True):
        t.copy_(x)
    g.replay()
    again = call()
    torch.cuda.synchronize()
    assert not torch.equal(again, eager)
    assert torch.equal(out, again), max_abs_err(out, again)


def run_threads(target: Callable[[int], None], n: int, timeout: float = 120.0) -> None:
    """``target(r)`` for r in 0..n-1, one thread each (rank threads of the CPU simulations of
    the multi-rank protocols); waits up to ``timeout`` seconds for each. ``target`` records its
    own errors (the caller asserts them)."""
    import threading

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
