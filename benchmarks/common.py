"""Shared benchmark machinery: timing, roofline figures, and the JSON result files.

Timing
------
:func:`bench` times one callable: warm-up calls, then the median of many timed calls measured
with CUDA events (wall clock on the CPU). Options:

* ``cold_l2``: before every timed call, write a buffer of at least twice the L2 size, so inputs
  that would fit in L2 are re-read from HBM (the flush runs before the start event: untimed).
* ``inputs``: a list of argument tuples; call ``i`` uses ``inputs[i % len(inputs)]`` (rotating
  input sets, the other way to defeat L2 reuse).
* ``cuda_graph``: capture one call per input set in a CUDA graph and time the replays (removes
  launch and Python overhead; what a graph-captured serving engine sees).

:func:`bench_interleaved` times several callables in alternating rounds so slow drifts (clocks,
temperature, a neighbour on the host) hit every candidate alike; use it whenever a result is
a ratio between candidates.

Results
-------
:func:`write_json` writes ``{"meta": {...}, "rows": [...]}`` where meta holds the GPU name,
torch/CUDA/cuDNN/NCCL versions, the git commit, the exact command and a UTC timestamp.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Summary of the timed calls, in milliseconds."""

    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    mean_ms: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        s = sorted(samples)
        q = statistics.quantiles(s, n=5) if len(s) >= 2 else [s[0]] * 4
        return cls(statistics.median(s), s[0], q[0], q[3], statistics.fmean(s), len(s))


class _L2Flusher:
    """A buffer of >= 2x the L2 size; ``flush()`` overwrites it on the current stream."""

    def __init__(self, device: torch.device) -> None:
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        self.buf = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=device)

    def flush(self) -> None:
        self.buf.fill_(0x5A)


def _as_calls(fn: Callable, inputs: Sequence[tuple] | None) -> list[Callable[[], object]]:
    if not inputs:
        return [fn]
    return [lambda a=a: fn(*a) for a in inputs]


def _graphs(calls: list[Callable[[], object]], device: torch.device) -> list[Callable[[], object]]:
    """Capture each call in its own CUDA graph (after a warm-up on a side stream)."""
    replays = []
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream(device).wait_stream(side)
    for c in calls:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            c()
        replays.append(g.replay)
    torch.cuda.synchronize(device)
    return replays


def _device_of(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
        torch.device("cpu"))


class _Timer:
    """Times calls one by one (events on a GPU), with the optional L2 flush before each."""

    def __init__(self, device: torch.device, cold_l2: bool) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.flusher = _L2Flusher(device) if (cold_l2 and self.cuda) else None

    def time(self, call: Callable[[], object], n: int) -> list[float]:
        out = []
        if not self.cuda:
            for _ in range(n):
                t0 = time.perf_counter()
                call()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for start, end in events:
            if self.flusher is not None:
                self.flusher.flush()
            start.record()
            call()
            end.record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in events]


def bench(
    fn: Callable,
    *,
    inputs: Sequence[tuple] | None = None,
    warmup: int = 10,
    iters: int = 50,
    cold_l2: bool = False,
    cuda_graph: bool = False,
    device: torch.device | str | None = None,
) -> Timing:
    """Median-of-``iters`` time of ``fn()`` (or ``fn(*inputs[i % len(inputs)])``) after warm-up.

    Each timed call is bracketed by its own pair of CUDA events; calls are queued back to back
    (no host sync between them) so the host's launch overhead overlaps the GPU's work, as in
    real inference, unless the kernel is shorter than the launch.
    """
    return bench_interleaved({"fn": fn}, inputs=inputs, warmup=warmup, iters=iters, rounds=1,
                             cold_l2=cold_l2, cuda_graph=cuda_graph, device=device)["fn"]


def bench_interleaved(
    fns: dict[str, Callable],
    *,
    inputs: Sequence[tuple] | None = None,
    warmup: int = 10,
    iters: int = 50,
    rounds: int = 5,
    cold_l2: bool = False,
    cuda_graph: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time several callables fairly: same inputs, same process, alternating rounds.

    Every callable gets ``warmup`` untimed calls, then ``rounds`` rounds in which each callable
    in turn (the order rotates every round) makes ``ceil(iters / rounds)`` timed calls. The
    result per callable is the summary over all its timed calls.
    """
    dev = _device_of(device)
    timer = _Timer(dev, cold_l2)
    calls = {name: _as_calls(fn, inputs) for name, fn in fns.items()}
    for name in calls:
        for i in range(warmup):
            calls[name][i % len(calls[name])]()
    if cuda_graph:
        if dev.type != "cuda":
            raise ValueError("bench: cuda_graph needs a CUDA device")
        calls = {name: _graphs(c, dev) for name, c in calls.items()}
        for c in calls.values():  # one untimed replay each: first replays upload the graph
            for r in c:
                r()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    per_round = max(1, -(-iters // rounds))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    counter = dict.fromkeys(names, 0)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            cs = calls[name]

            def one(cs=cs, name=name):
                cs[counter[name] % len(cs)]()
                counter[name] += 1

            samples[name] += timer.time(one, per_round)
    return {name: Timing.of(s) for name, s in samples.items()}


# ----------------------------------------------------------------------------------- rooflines


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int) -> float:
    """FLOPs of softmax attention, forward: two GEMMs of 2*Sq*Sk*D each per (batch, head)."""
    return 4.0 * batch * heads * seq_q * seq_k * head_dim


def attention_tflops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int,
                     ms: float) -> float:
    """Achieved TFLOPS: 4*B*H*Sq*Sk*D / t."""
    return attention_flops(batch, heads, seq_q, seq_k, head_dim) / (ms * 1e-3) / 1e12


def host_samples_us(fn: Callable[[], object], n: int = 30,
                    sleep_cycles: int = int(3e9)) -> list[float]:
    """Host time (us) of each of ``n`` calls of ``fn`` while the GPU is busy (a sleep queued
    ahead of them: the calls never wait for it). Under torch.distributed every rank starts
    together (a barrier first)."""
    torch.cuda.synchronize()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    torch.cuda._sleep(sleep_cycles)  # GPU work queued ahead of the calls (3e9: ~1.5 s)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return samples


def gbps(num_bytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes per second)."""
    return num_bytes / (ms * 1e-3) / 1e9


def parallel_efficiency(t1_ms: float, n: int, tn_ms: float) -> float:
    """T1 / (N * TN): 1.0 is perfect scaling over N devices."""
    return t1_ms / (n * tn_ms)


# ------------------------------------------------------------------------------------- results


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _version(fn: Callable[[], object]) -> str | None:
    try:
        v = fn()
    except Exception:  # a missing library is recorded as None, not fatal
        return None
    if isinstance(v, tuple):
        return ".".join(map(str, v))
    return None if v is None else str(v)


def env_info() -> dict:
    """The machine and software a result was measured on."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                         "sms": p.multi_processor_count,
                         "memory_gib": round(p.total_memory / 2**30, 1),
                         "l2_mib": round(p.L2_cache_size / 2**20, 1)})
    commit = _git("rev-parse", "HEAD")
    # Without a usable repository git may print "HEAD" or nothing: only a hash counts.
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        commit = ""
    dirty = bool(commit) and bool(_git("status", "--porcelain", "--untracked-files=no"))
    if os.environ.get("XDIT_OPS_GIT_COMMIT"):
        # The GPU machine gets a copy of the working tree whose .git (if any) may be a stale
        # snapshot (seen: HEAD of an earlier session, the new work as changes on top): the caller
        # names the commit it copied, and that wins.
        commit = os.environ["XDIT_OPS_GIT_COMMIT"]
        dirty = False
    return {
        "gpu": gpus[0]["name"] if gpus else None,
        "gpus": gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": _version(torch.backends.cudnn.version),
        "nccl": _version(torch.cuda.nccl.version) if torch.cuda.is_available() else None,
        "triton": _version(lambda: __import__("triton").__version__),
        "python": platform.python_version(),
        "git_commit": commit + ("-dirty" if dirty else "") if commit else None,
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)]
                            + sys.argv),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("XDIT_OPS_", "NCCL_NVLS", "TORCH_SYMM_MEM", "NVSHMEM_DISABLE",
                                 "CUDA_VISIBLE_DEVICES"))},
    }


def write_json(name: str, rows: list[dict], out: str | os.PathLike | None = None,
               extra: dict | None = None) -> Path:
    """Write ``{"meta": env_info() | extra, "rows": rows}`` to ``<out>/<name>-<gpu>-<time>.json``.

    Under torchrun only rank 0 writes. Returns the path (also for the ranks that did not write).
    """
    meta = env_info() | {"benchmark": name} | (extra or {})
    gpu = (meta["gpu"] or "cpu").replace(" ", "_").replace("/", "_")
    stamp = meta["timestamp"].replace(":", "").replace("-", "").split("+")[0]
    world = meta["world_size"]
    fname = f"{name}-{gpu}" + (f"-x{world}" if world > 1 else "") + f"-{stamp}.json"
    path = Path(out or DEFAULT_OUT) / fname
    if int(os.environ.get("RANK", "0")) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=_jsonable)
                        + "\n")
    return path


def _jsonable(x: object) -> object:
    if isinstance(x, Timing):
        return asdict(x)
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    raise TypeError(f"write_json: cannot serialise {type(x).__name__}")


def print_table(rows: list[dict], cols: Sequence[str], floatfmt: str = ".3g") -> None:
    """A plain fixed-width table of ``cols`` from ``rows``."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "-" if v is None else str(v)

    body = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for b in body:
        print("  ".join(x.ljust(w) for x, w in zip(b, widths, strict=True)))


def bshd_shape(text: str) -> tuple[int, int, int, int]:
    """argparse ``type=`` for a ``B,S,H,D`` attention shape."""
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape must be B,S,H,D, got {text}")
    return parts  # type: ignore[return-value]


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options every benchmark script takes."""
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="folder for the JSON result (default benchmarks/results/)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per candidate")
    p.add_argument("--iters", type=int, default=100, help="timed calls per candidate")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--cold-l2", action="store_true", help="flush L2 before every timed call")
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays")
    p.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")


def native_gpu_missing(name: str) -> str | None:
    """Why benchmark ``name`` cannot time the native ops here, or None when it can.

    Two reasons: no CUDA GPU, or ``xdit_ops._C`` not loaded (the ops would then run their torch
    references, so the "op" rows would time torch). Print the message and exit 2.
    """
    if not torch.cuda.is_available():
        return f"{name}: needs a CUDA GPU"
    from xdit_ops import _extension

    if not _extension.has("_C"):
        return (f"{name}: xdit_ops._C is not loaded ({_extension.reason('_C')}): the op would run "
                "its torch reference")
    return None


def iters_of(args: argparse.Namespace) -> tuple[int, int, int]:
    """(warmup, iters, rounds), reduced under --quick."""
    if args.quick:
        return min(args.warmup, 3), min(args.iters, 10), min(args.rounds, 2)
    return args.warmup, args.iters, args.rounds
