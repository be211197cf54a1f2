"""The ring's merge kernels: the vector kernels against the scalar (warp-per-row) ones.

``usp_attention``'s ring merges its N partial outputs once per call with
``xdit_ops::merge_attention_partials``; ``merge_attention_states_`` is the in-place fp32
accumulator merge. Each op has a scalar kernel (one warp per (b, s, h) row, 2-byte loads at a
lane stride of 32) and a vector kernel (16-byte loads and stores); the launcher reads
``XDIT_OPS_MERGE_IMPL`` on every call, so one process times both: ``scalar`` forces the scalar
kernel, ``auto`` takes the vector kernel where it can (every case here can).

Cases: the per-rank merges of a ring of 4 at (1,32760,40,128) (N = 4 bf16 partials of
(1,8190,40,128)), at (1,16896,24,128) and (1,4608,24,128) (N = 4), a ring of 2 at
(1,16896,24,128) (N = 2), and ``merge_attention_states_`` (fp32 accumulator, bf16 block) at
(1,8190,40,128).

Reported per case, kernel and mode (eager calls, and CUDA-graph replays that take the host's
launch cost out): median us, GB/s = (bytes read + written, LSEs included) / t, that over what
``copy_`` sustains in the same process for the same bytes and for 1 GiB, over the nominal HBM
peak where the GPU is known, the speedup over the scalar kernel, and whether both kernels'
results are bit-equal (the exit code is 1 if not). Inputs rotate over enough copies to exceed
twice the L2 cache, so a small case reads HBM, not L2.

    python benchmarks/bench_merge.py [--out DIR] [--quick] [--cuda-graph] [--cold-l2]

``--cuda-graph``: graph replays only (default: eager and graph rows).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import xdit_ops  # noqa: E402, F401  (registers the ops)

# Nominal HBM bandwidth (GB/s) by device name prefix, for the fraction-of-peak column.
NOMINAL_GBPS = {"NVIDIA H100 80GB HBM3": 3350.0, "NVIDIA H200": 4800.0}

# (name, op, (B, S, H, D), N partials)
CASES = [
    ("ring4_32760_h40", "partials", (1, 8190, 40, 128), 4),
    ("ring4_16896_h24", "partials", (1, 4224, 24, 128), 4),
    ("ring4_4608_h24", "partials", (1, 1152, 24, 128), 4),
    ("ring2_16896_h24", "partials", (1, 8448, 24, 128), 2),
    ("states_32760_h40", "states", (1, 8190, 40, 128), 1),
]
IMPLS = ("scalar", "auto")
ENV = "XDIT_OPS_MERGE_IMPL"


def merge_bytes(op: str, shape: tuple[int, int, int, int], n: int, elem: int = 2) -> int:
    """Bytes a merge reads and writes.

    partials: N partials and N LSEs read, one output (``elem`` bytes an element) and one LSE
    written. states: the fp32 accumulator and its LSE read and written, the block (``elem``
    bytes an element) and its LSE read.
    """
    B, S, H, D = shape
    rows = B * S * H
    if op == "partials":
        return n * rows * (D * elem + 4) + rows * (D * elem + 4)
    if op == "states":
        return 2 * rows * (D * 4 + 4) + rows * (D * elem + 4)
    raise ValueError(f"bench_merge: unknown op {op!r}")


def input_sets(nbytes: int, l2_bytes: int) -> int:
    """Copies of the inputs to rotate over so that one round touches >= 2x the L2 size."""
    return max(1, min(8, math.ceil(2 * l2_bytes / nbytes)))


def make_inputs(op, shape, n, dev, seed):
    """One input set: (partial outputs, partial LSEs) or (out, lse, block_out, block_lse)."""
    B, S, H, D = shape
    g = torch.Generator(device=dev).manual_seed(seed)
    if op == "partials":
        outs = [torch.randn(B, S, H, D, device=dev, generator=g).to(torch.bfloat16)
                for _ in range(n)]
        lses = [4 * torch.randn(B, H, S, device=dev, generator=g) for _ in range(n)]
        return outs, lses
    out = torch.randn(B, S, H, D, device=dev, generator=g)
    lse = torch.randn(B, H, S, device=dev, generator=g)
    blk = torch.randn(B, S, H, D, device=dev, generator=g).to(torch.bfloat16)
    blk_lse = torch.randn(B, H, S, device=dev, generator=g)
    return out, lse, blk, blk_lse


def call_of(op: str, impl: str):
    """The timed call: set the kernel choice, call the op as the ring does (no Python checks)."""
    if op == "partials":
        merge = torch.ops.xdit_ops.merge_attention_partials.default

        def run(outs, lses):
            os.environ[ENV] = impl
            return merge(outs, lses, torch.bfloat16)
    else:
        merge = torch.ops.xdit_ops.merge_attention_states_.default

        def run(out, lse, blk, blk_lse):
            os.environ[ENV] = impl
            merge(out, lse, blk, blk_lse)
    return run


def bit_equal(op: str, inputs: tuple) -> bool:
    """Whether both kernels give the same bits on one input set (copies for the in-place op)."""
    results = []
    for impl in IMPLS:
        args = inputs
        if op == "states":
            args = (inputs[0].clone(), inputs[1].clone(), inputs[2], inputs[3])
        r = call_of(op, impl)(*args)
        results.append(r if op == "partials" else args[:2])
    torch.cuda.synchronize()
    (a_out, a_lse), (b_out, b_lse) = results
    return bool(torch.equal(a_out, b_out) and torch.equal(a_lse, b_lse))


def copy_gbps(nbytes: int, sets: int, dev, warmup: int, iters: int, rounds: int,
              cuda_graph: bool) -> float:
    """What ``dst.copy_(src)`` sustains moving ``nbytes`` (read + write), rotating ``sets``
    buffer pairs as the merge rotates its inputs."""
    half = max(nbytes // 2, 1)
    pairs = [(torch.empty(half, dtype=torch.uint8, device=dev),
              torch.empty(half, dtype=torch.uint8, device=dev)) for _ in range(sets)]
    t = common.bench_interleaved({"copy": lambda src, dst: dst.copy_(src)}, inputs=pairs,
                                 warmup=warmup, iters=iters, rounds=rounds,
                                 cuda_graph=cuda_graph, device=dev)["copy"]
    return common.gbps(2 * half, t.median_ms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    args = p.parse_args(argv)
    missing = common.native_gpu_missing("bench_merge")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    warmup, iters, rounds = common.iters_of(args)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    name = props.name
    nominal = next((v for k, v in NOMINAL_GBPS.items() if name.startswith(k)), None)
    modes = [True] if args.cuda_graph else [False, True]
    env_before = os.environ.get(ENV)
    copy_1gib = copy_gbps(1 << 31, 1, dev, warmup, iters, rounds, False)

    rows = []
    try:
        for case, op, shape, n in CASES:
            nbytes = merge_bytes(op, shape, n)
            sets = input_sets(nbytes, props.L2_cache_size)
            inputs = [make_inputs(op, shape, n, dev, seed) for seed in range(sets)]
            exact = bit_equal(op, inputs[0])
            for graph in modes:
                copy_same = copy_gbps(nbytes, sets, dev, warmup, iters, rounds, graph)
                timings = common.bench_interleaved(
                    {impl: call_of(op, impl) for impl in IMPLS}, inputs=inputs, warmup=warmup,
                    iters=iters, rounds=rounds, cold_l2=args.cold_l2, cuda_graph=graph,
                    device=dev)
                base_ms = timings["scalar"].median_ms
                for impl, t in timings.items():
                    gb = common.gbps(nbytes, t.median_ms)
                    rows.append({
                        "case": case, "op": op, "impl": impl,
                        "mode": "graph" if graph else "eager", "shape": list(shape), "n": n,
                        "dtype": "bfloat16", "us": 1e3 * t.median_ms, "gbps": gb,
                        "bytes": nbytes, "input_sets": sets,
                        "copy_gbps_same_bytes": copy_same, "of_copy_same_bytes": gb / copy_same,
                        "of_copy_1GiB": gb / copy_1gib,
                        "of_nominal_peak": gb / nominal if nominal else None,
                        "speedup_vs_scalar": base_ms / t.median_ms,
                        "bit_exact_vs_scalar": exact, "timing": t,
                    })
            del inputs
            torch.cuda.empty_cache()
    finally:
        if env_before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = env_before
    path = common.write_json("bench_merge", rows, args.out, extra={
        "warmup": warmup, "iters": iters, "rounds": rounds, "cold_l2": args.cold_l2,
        "modes": ["graph" if g else "eager" for g in modes], "copy_gbps_1GiB": copy_1gib,
        "nominal_gbps": nominal})
    common.print_table(rows, ["case", "impl", "mode", "us", "gbps", "of_copy_same_bytes",
                              "of_copy_1GiB", "of_nominal_peak", "speedup_vs_scalar",
                              "bit_exact_vs_scalar"])
    print(f"copy_ 1 GiB: {copy_1gib:.0f} GB/s; nominal {nominal} GB/s ({name})")
    print(f"wrote {path}")
    return 0 if all(r["bit_exact_vs_scalar"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
