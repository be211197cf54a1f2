"""The ``xdit-ops`` command.

``xdit-ops doctor``
    What this machine offers: torch, CUDA, cuDNN and NCCL versions, the GPUs and their peer
    links, which native modules are loaded (and why not), which attention backends can run on
    each device for each dtype and head dim (and why not).

``xdit-ops run [--job NAME[,NAME...]]``
    The main job on an embedded default (nothing is downloaded). Jobs register themselves with
    :func:`register_job`; ``attention`` runs every usable ``xdit_ops.attention`` backend on every
    local device (the CPU and each GPU) against the fp32 reference and prints error and time;
    ``usp`` runs ``usp_attention`` (Ulysses, ring, hybrid) over 2 gloo processes on the CPU and
    over every GPU with NCCL against attention over the whole sequence. The exit code is
    non-zero when any check fails.

Adding a job: in this module (or in a module this one imports, so it is registered before the
parser is built), write ``def my_job(args) -> list[Check]`` and decorate it with
``@register_job("name", "one line of help")``; its checks are printed in the common table and
any failed one makes the command exit non-zero. Options shared by every job live in
:func:`_run_parser`; a job that needs more adds them with ``register_job(..., add_args=fn)``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------- doctor

DOCTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOCTOR_HEAD_DIMS = (64, 72, 128, 256)


def _try(fn: Callable[[], object]) -> str:
    try:
        value = fn()
    except Exception as exc:  # a diagnostic must report the failure, not stop on it
        return f"unavailable ({type(exc).__name__}: {exc})"
    return "none" if value is None else str(value)


def _nccl_version() -> object:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else v


def local_devices() -> list[torch.device]:
    """The CPU and every visible GPU."""
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


def _device_title(dev: torch.device) -> str:
    if dev.type != "cuda":
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    p = torch.cuda.get_device_properties(dev)
    return (f"{dev} ({p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB)")


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype).replace("torch.", ""))


def _backend_grid(dev: torch.device) -> list[str]:
    from xdit_ops.ops.attention import BACKENDS, backend_unusable_reason, select_backend

    cols = [(dt, d) for dt in DOCTOR_DTYPES for d in DOCTOR_HEAD_DIMS]
    head = ["backend".ljust(10)] + [f"{_short(dt)}/{d}".rjust(9) for dt, d in cols]
    lines = [" ".join(head)]
    reasons: list[str] = []
    for b in BACKENDS:
        if b == "auto":
            continue
        cells = []
        for dt, d in cols:
            why = backend_unusable_reason(b, dev, dt, d)
            if why is None:
                cells.append("yes".rjust(9))
            else:
                if why not in reasons:
                    reasons.append(why)
                cells.append(f"no[{reasons.index(why) + 1}]".rjust(9))
        lines.append(" ".join([b.ljust(10)] + cells))
    lines.append(" ".join(["auto ->".ljust(10)]
                          + [select_backend(dev, dt, d).rjust(9) for dt, d in cols]))
    lines += [f"  [{i + 1}] {r}" for i, r in enumerate(reasons)]
    return lines


def doctor(args: argparse.Namespace) -> int:
    import xdit_ops
    from xdit_ops import _extension

    out: list[str] = []
    p = out.append
    p(f"xdit_ops  {xdit_ops.__version__} ({os.path.dirname(xdit_ops.__file__)})")
    p(f"python    {sys.version.split()[0]} ({sys.executable})")
    p(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}"
      f"{', HIP ' + torch.version.hip if torch.version.hip else ''})")
    p(f"cuDNN     {_try(torch.backends.cudnn.version)}")
    p(f"NCCL      {_try(_nccl_version) if torch.cuda.is_available() else 'n/a (no GPU)'}")
    p(f"triton    {_try(lambda: __import__('triton').__version__)}")
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    p(f"nvcc      {nvcc or 'not found'}")
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith(("XDIT_OPS_", "NCCL_NVLS", "TORCH_SYMM_MEM", "NVSHMEM_DISABLE",
                            "TORCH_CUDA_ARCH_LIST", "CUDA_VISIBLE_DEVICES"))}
    p("env       " + (" ".join(f"{k}={v}" for k, v in env.items()) or "(no relevant switches)"))
    p("")
    p("native modules:")
    for name in _extension._MODULES:
        state = "loaded" if _extension.has(name) else f"NOT loaded: {_extension.reason(name)}"
        p(f"  xdit_ops.{name:<8} {state}")
    p("")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    p(f"GPUs: {n}")
    for i in range(n):
        p(f"  {_device_title(torch.device('cuda', i))}")
    if n > 1:
        p("peer access (torch.cuda.can_device_access_peer, row -> column):")
        p("      " + " ".join(f"{j:>4}" for j in range(n)))
        for i in range(n):
            cells = ["   -" if i == j else
                     ("  ok" if torch.cuda.can_device_access_peer(i, j) else "  NO")
                     for j in range(n)]
            p(f"  {i:>3} " + " ".join(cells))
    if shutil.which("nvidia-smi") and n > 0:
        try:
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
            p("nvidia-smi topo -m:")
            out.extend("  " + line for line in topo.splitlines())
        except (OSError, subprocess.TimeoutExpired) as exc:
            p(f"nvidia-smi topo -m failed: {exc}")
    p("")
    for dev in local_devices():
        p(f"attention backends on {_device_title(dev)}  (columns: dtype/head_dim)")
        out.extend("  " + line for line in _backend_grid(dev))
        p("")
    print("\n".join(out))
    return 0


# ------------------------------------------------------------------------------------------- run


@dataclass
class Check:
    """One line of ``xdit-ops run``'s table."""

    job: str
    device: str
    what: str
    error: float | None = None
    tolerance: float | None = None
    time_ms: float | None = None
    ok: bool = False
    note: str = ""


@dataclass
class Job:
    name: str
    help: str
    fn: Callable[[argparse.Namespace], list[Check]]
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    default: bool = True


JOBS: dict[str, Job] = {}


def register_job(
    name: str,
    help: str,
    *,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    default: bool = True,
) -> Callable[[Callable[[argparse.Namespace], list[Check]]], Callable]:
    """Register ``fn(args) -> list[Check]`` as ``xdit-ops run --job name``.

    ``default`` jobs run when ``--job`` is not given; ``add_args`` adds job-specific options.
    """

    def deco(fn: Callable[[argparse.Namespace], list[Check]]) -> Callable:
        JOBS[name] = Job(name, help, fn, add_args, default)
        return fn

    return deco


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# Relative (Frobenius) error of a backend's output against the fp32 reference. A correct
# kernel lands an order of magnitude below these; a wrong one (a bad scale, a missed block,
# swapped heads) lands near 1.
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
BACKEND_REL_TOL = {"fp8": 1e-1}
CPU_SHAPE = (1, 256 + 77, 8, 64)
GPU_SHAPE = (1, 1024 + 77, 24, 128)


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(x) for x in text.replace("x", ",").split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be B,S,H,D with positive sizes, got {text}")
    return parts  # type: ignore[return-value]


def _attention_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job attention")
    g.add_argument("--shape", type=_parse_shape, default=None,
                   help=f"B,S,H,D for every device (default {GPU_SHAPE} on GPU, "
                        f"{CPU_SHAPE} on CPU)")
    g.add_argument("--max-rel-err", type=float, default=None,
                   help="override the per-dtype relative error tolerance")


@register_job("attention", "every usable attention backend on every local device vs the fp32 "
              "reference", add_args=_attention_args)
def attention_job(args: argparse.Namespace) -> list[Check]:
    import xdit_ops
    from xdit_ops.ops.attention import BACKENDS, backend_unusable_reason
    from xdit_ops.reference import attention_ref

    checks = []
    for dev in _selected_devices(args):
        shape = args.shape or (GPU_SHAPE if dev.type == "cuda" else CPU_SHAPE)
        B, S, H, D = shape
        dtypes = [torch.bfloat16, torch.float16, torch.float32]
        gen = torch.Generator(device="cpu").manual_seed(0)
        base = [torch.randn(B, S, H, D, generator=gen).to(dev) for _ in range(3)]
        for dtype in dtypes:
            q, k, v = (t.to(dtype) for t in base)
            # The fp32 reference on the same (rounded) inputs, on the same device.
            ref = attention_ref(q.float(), k.float(), v.float())[0]
            for b in BACKENDS:
                if b == "auto" or backend_unusable_reason(b, dev, dtype, D) is not None:
                    continue
                tol = args.max_rel_err if args.max_rel_err is not None else BACKEND_REL_TOL.get(
                    b, REL_TOL[dtype])
                what = f"{b:<9} {_short(dtype)} {B}x{S}x{H}x{D}"
                c = Check("attention", str(dev), what, tolerance=tol)
                try:
                    out = xdit_ops.attention(q, k, v, backend=b)
                    diff = (out.float() - ref).norm() / ref.norm()
                    c.error = float(diff)
                    c.ok = bool(torch.isfinite(out).all()) and c.error <= tol
                    if not torch.isfinite(out).all():
                        c.note = "non-finite output"
                    c.time_ms = time_ms(lambda q=q, k=k, v=v, b=b: xdit_ops.attention(
                        q, k, v, backend=b), dev, args.warmup, args.iters)
                except Exception as exc:  # a failing backend is a failed check, not a crash
                    c.note = f"{type(exc).__name__}: {exc}"[:200]
                checks.append(c)
    if not checks:
        checks.append(Check("attention", "-", "no usable backend on any device", note="none ran"))
    return checks


def _selected_devices(args: argparse.Namespace) -> list[torch.device]:
    devs = local_devices()
    if args.device == "all":
        return devs
    if args.device == "cuda":
        return [d for d in devs if d.type == "cuda"]
    want = torch.device(args.device)
    if want not in devs:
        raise SystemExit(f"xdit-ops run: device {args.device!r} is not present; have "
                         f"{', '.join(str(d) for d in devs)}")
    return [want]


# ------------------------------------------------------------------------------- job: usp


USP_SHAPE_CPU = (1, 256, 8, 64)
USP_SHAPE_GPU = (1, 4608, 24, 128)
USP_JOINT = 77


def _usp_configs(world: int) -> list[tuple[int, int]]:
    configs = [(world, 1), (1, world)]
    if world >= 4 and world % 2 == 0:
        configs.append((2, world // 2))
    return configs


def _usp_worker(rank: int, world: int, port: int, device_type: str, shape, iters: int,
                queue) -> None:
    """One rank of the usp job: usp_attention on its shard vs attention over everything."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    for var, val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(var, val)
    import xdit_ops
    from xdit_ops.reference import attention_ref

    results = []
    try:
        torch.set_num_threads(1)
        dev = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        B, S, H, D = shape
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(B, USP_JOINT + S, H, D, generator=gen) for _ in range(3)]
        ref, _ = attention_ref(*(t.to(dev) for t in full))  # fp32 over joint + sequence
        for u, r in _usp_configs(world):
            xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r, device_type=device_type)
            local = []
            for t in full:
                shard, seq_len = xdit_ops.shard_sequence(t[:, USP_JOINT:].to(dev, dtype))
                local.append(torch.cat([t[:, :USP_JOINT].to(dev, dtype), shard], dim=1))

            def call(local=local, seq_len=seq_len):
                return xdit_ops.usp_attention(*local, joint_tokens=USP_JOINT, seq_len=seq_len)

            ms = time_ms(call, dev, warmup=2, iters=iters)
            out = call()
            seq = xdit_ops.gather_sequence(out[:, USP_JOINT:].contiguous(), seq_len)
            got = torch.cat([out[:, :USP_JOINT], seq], dim=1).float()
            err = ((got - ref).norm() / ref.norm()).item()
            results.append((u, r, err, ms))
        if rank == 0:
            queue.put(("ok", results))
    except Exception as exc:  # reported as a failed check, not a hang
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _usp_spawn(device_type: str, world: int, shape, iters: int, timeout: float):
    import torch.multiprocessing as mp

    from xdit_ops.parallel.state import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_usp_worker, args=(r, world, port, device_type, shape, iters,
                                                   queue), daemon=True) for r in range(world)]
    env_cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device_type == "cpu":  # gloo workers must not touch the GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        for p in procs:
            p.start()
    finally:
        if device_type == "cpu":
            if env_cvd is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = env_cvd
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = any(p.is_alive() for p in procs)
    for p in procs:
        if p.is_alive():
            p.kill()
    msgs = []
    while not queue.empty():
        msgs.append(queue.get())
    errors = [m for kind, m in msgs if kind == "error"]
    if errors or hung:
        return None, "; ".join(errors) or f"timed out after {timeout:.0f} s"
    oks = [m for kind, m in msgs if kind == "ok"]
    return (oks[0], "") if oks else (None, "no result from rank 0")


def _usp_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job usp")
    g.add_argument("--usp-timeout", type=float, default=300.0,
                   help="seconds before a usp world is declared hung (default 300)")


@register_job("usp", "usp_attention (Ulysses, ring, hybrid) over processes vs attention over the "
              "whole sequence: 2 gloo ranks on the CPU, NCCL over every GPU",
              add_args=_usp_args)
def usp_job(args: argparse.Namespace) -> list[Check]:
    devs = _selected_devices(args)
    worlds = []
    if any(d.type == "cpu" for d in devs):
        worlds.append(("cpu", 2, USP_SHAPE_CPU, torch.float32))
    n_gpu = sum(d.type == "cuda" for d in devs)
    if n_gpu >= 2:
        worlds.append(("cuda", n_gpu, USP_SHAPE_GPU, torch.bfloat16))
    checks = []
    for device_type, world, shape, dtype in worlds:
        tol = REL_TOL[dtype]
        label = f"{device_type} x{world}"
        what = f"{_short(dtype)} {'x'.join(map(str, shape))}+{USP_JOINT}"
        results, why = _usp_spawn(device_type, world, shape, args.iters, args.usp_timeout)
        if results is None:
            checks.append(Check("usp", label, what, ok=False, note=why[:200]))
            continue
        for u, r, err, ms in results:
            checks.append(Check("usp", label, f"U{u}xR{r} {what}", error=err, tolerance=tol,
                                time_ms=ms, ok=err <= tol))
    if not worlds:
        checks.append(Check("usp", "-", "no CPU and fewer than 2 GPUs selected", ok=True,
                            note="skipped"))
    return checks


def _print_table(checks: list[Check]) -> None:
    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    rows = [("job", "device", "check", "rel err", "tol", "ms", "result")]
    for c in checks:
        rows.append((c.job, c.device, c.what, fmt(c.error, ".2e"), fmt(c.tolerance, ".0e"),
                     fmt(c.time_ms, ".3f"), ("ok" if c.ok else "FAIL")
                     + (f" ({c.note})" if c.note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])


def run(args: argparse.Namespace) -> int:
    names = [n for n, j in JOBS.items() if j.default] if not args.job else args.job.split(",")
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        print(f"xdit-ops run: unknown job(s) {unknown}; known: {sorted(JOBS)}", file=sys.stderr)
        return 2
    checks: list[Check] = []
    for n in names:
        t0 = time.perf_counter()
        print(f"== job {n}: {JOBS[n].help}", flush=True)
        checks += JOBS[n].fn(args)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
    _print_table(checks)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed"
          + (f"; FAILED: {', '.join(c.device + ' ' + c.what.split()[0] for c in failed)}"
             if failed else ""))
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------ main


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the main job(s) on the embedded default",
                       description="Run checks; exit code 1 if any fails. Jobs: " + "; ".join(
                           f"{j.name}: {j.help}" for j in JOBS.values()))
    p.add_argument("--job", default=None,
                   help=f"comma-separated jobs (default: all default jobs: "
                        f"{','.join(n for n, j in JOBS.items() if j.default)})")
    p.add_argument("--device", default="all",
                   help="all (default: the CPU and every GPU), cpu, cuda (every GPU) or cuda:N")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--iters", type=int, default=10, help="timed calls (median reported)")
    for job in JOBS.values():
        if job.add_args is not None:
            job.add_args(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdit-ops", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", help="versions, GPUs, links, native modules, usable backends")
    d.set_defaults(func=doctor)
    _run_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
