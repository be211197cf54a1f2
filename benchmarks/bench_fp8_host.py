"""Host time of eager ``xdit_ops.fp8_attention`` calls, and whether back-to-back calls keep the
GPU busy (one GPU).

For each shape (bf16, DiT-like inputs), after warm-up:

* ``host_us``: median host time of one call while the GPU is busy (a queued sleep ahead of the
  calls, so none waits for it), for the op with its fast path (default: a replay of the first
  call's launches) and without it (``XDIT_OPS_FP8_FAST_PATH=0``), the quantization pass alone
  (the op's direct path and the public ``quantize_qkv_triton``, a ``triton_op``), and one
  trivial aten op (the host's floor). Measured in interleaved rounds (one candidate after
  another in every round).
* ``gpu_us``: the GPU time of one call (CUDA events around a call queued behind a sleep: the
  host has queued everything before the GPU reaches it).
* ``b2b_us``: the wall time per call of back-to-back calls (after a synchronize, until the last
  finishes): about ``gpu_us`` when the GPU stays busy, the host time when the host is the
  bottleneck. ``tflops_b2b``: 4 B H S^2 D / ``b2b_us``.

    python benchmarks/bench_fp8_host.py [--shape 1,4608,24,128 ...] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xdit_ops  # noqa: E402
from benchmarks.common import (  # noqa: E402
    attention_tflops,
    bshd_shape,
    host_samples_us,
    native_gpu_missing,
    print_table,
    write_json,
)
from xdit_ops.reference.fp8_attention import dit_like_qkv  # noqa: E402
from xdit_ops.triton import fp8_attention as tfa  # noqa: E402

FAST_ENV = "XDIT_OPS_FP8_FAST_PATH"
SHAPES = ((1, 4608, 24, 128), (2, 4250, 24, 64), (1, 16896, 24, 128))
SLEEP = int(2e9)  # ~1 s of GPU work queued ahead of the host-timed calls


class _env:
    """``XDIT_OPS_FP8_FAST_PATH`` set to ``value`` (None: unset) inside the block."""

    def __init__(self, value: str | None):
        self.value = value

    def __enter__(self):
        self.old = os.environ.get(FAST_ENV)
        self._set(self.value)

    def __exit__(self, *exc):
        self._set(self.old)

    @staticmethod
    def _set(value):
        if value is None:
            os.environ.pop(FAST_ENV, None)
        else:
            os.environ[FAST_ENV] = value


def host_us(cands: dict, rounds: int, n: int) -> dict[str, float]:
    """Median host time (us) of one call of each candidate, interleaved rounds of ``n`` calls;
    the environment switch is set around each round (not inside the timed calls)."""
    samples: dict[str, list[float]] = {c: [] for c in cands}
    for _ in range(rounds):
        for name, (fn, env) in cands.items():
            with _env(env):
                for _ in range(3):
                    fn()
                samples[name] += host_samples_us(fn, n, SLEEP)
    return {c: statistics.median(s) for c, s in samples.items()}


def gpu_us(fn, n: int) -> float:
    """Median GPU time (us) of one call queued behind a sleep."""
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e8))
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def b2b_us(cands: dict, n: int, rounds: int) -> dict[str, float]:
    """Median over interleaved rounds of the wall time per call of ``n`` back-to-back calls of
    each candidate."""
    per: dict[str, list[float]] = {c: [] for c in cands}
    for _ in range(rounds):
        for name, (fn, env) in cands.items():
            with _env(env):
                fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                torch.cuda.synchronize()
                per[name].append((time.perf_counter() - t0) * 1e6 / n)
    return {c: statistics.median(x) for c, x in per.items()}


def measure(shape: tuple[int, int, int, int], args: argparse.Namespace) -> dict:
    B, S, H, D = shape
    direct = getattr(tfa, "_quantize_qkv", None)  # absent on commits before the fast path
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    floor_x = torch.empty(8, device="cuda")

    def op():
        return xdit_ops.fp8_attention(q, k, v)

    cands = {
        "op": (op, None),
        "op_no_fast_path": (op, "0"),
        "pass_triton_op": (lambda: tfa.quantize_qkv_triton(q, k, v, vt_pv_order=True,
                                                           k_block=128), None),
        "aten_add": (lambda: floor_x.add(1), None),
    }
    if direct is not None:
        cands["pass_direct"] = (lambda: direct(q, k, v, None, True, None, 128, direct=True),
                                None)
    h = host_us(cands, args.rounds, args.n)
    g = gpu_us(op, 15)
    bb = b2b_us({c: cands[c] for c in ("op", "op_no_fast_path")}, 30, 5)
    row = {"shape": f"({B},{S},{H},{D})"}
    row |= {f"host_us_{c}": round(x, 1) for c, x in h.items()}
    row |= {"gpu_us_op": round(g, 1)}
    row |= {f"b2b_us_{c}": round(x, 1) for c, x in bb.items()}
    row |= {f"tflops_b2b_{c}": round(attention_tflops(B, H, S, S, D, x / 1e3), 1)
            for c, x in bb.items()}
    row["tflops_gpu_op"] = round(attention_tflops(B, H, S, S, D, g / 1e3), 1)
    print(row, flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=bshd_shape, action="append")
    p.add_argument("--out", default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=20, help="host-timed calls per candidate a round")
    p.add_argument("--quick", action="store_true", help="2 rounds of 10 calls (smoke run)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.n = min(args.rounds, 2), min(args.n, 10)
    why = native_gpu_missing("bench_fp8_host")
    if why:
        print(why)
        return 2
    rows = [measure(shape, args) for shape in args.shape or SHAPES]
    cols = list(rows[0])
    print_table(rows, cols)
    print(write_json("bench_fp8_host", rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
