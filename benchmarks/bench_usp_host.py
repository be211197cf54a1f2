"""Where the host time of one eager usp_attention call goes, piece by piece.

Under torchrun on N GPUs (all of them Ulysses, then all of them ring), at one shape (default
(1,4608,24,128), bf16), after the call graph of the signature exists: the median host time
(slowest rank) of the whole eager call with the fast path, without it (the op's dispatch, plan
lookup and Python replay), and of each piece the fast path runs alone: the argument checks and
group names, the signature key, the plain-call test, the native graph_call_run (the copy
nodes' parameters, the output's allocation, one graph launch), graph_call_run with no output,
torch's CUDAGraph.replay() of the same graph (its launch, the copy nodes idle), one empty
output, and one trivial aten op (the dispatcher's floor).
The GPU is kept busy (a queued sleep) so no call waits for it.

    torchrun --nproc-per-node=2 benchmarks/bench_usp_host.py [--shape 1,4608,24,128] [--out DIR]
"""
# xdit-bench: torchrun

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xdit_ops  # noqa: E402
from benchmarks.bench_usp import max_over_ranks  # noqa: E402
from benchmarks.common import bshd_shape, host_samples_us, print_table, write_json  # noqa: E402
from xdit_ops.ops._lib import plain_call  # noqa: E402

_usp = importlib.import_module("xdit_ops.ops.usp_attention")


def host_us(fn, n: int = 60) -> float:
    """Median host time (us) of ``fn`` over ``n`` calls queued behind a GPU sleep, slowest
    rank."""
    return max_over_ranks(statistics.median(host_samples_us(fn, n, sleep_cycles=int(5e8))))


def pieces(q, k, v) -> dict[str, float]:
    for _ in range(4):  # plan, warm-up, capture, the fast path's entry
        xdit_ops.usp_attention(q, k, v)
    u, r = _usp._groups_from(None)
    fk = _usp._fast_key(q, k, v, 0, "front", None, None, None, "auto", u, r, False, None)
    state = _usp._FAST.get(fk)
    res = {"call": host_us(lambda: xdit_ops.usp_attention(q, k, v))}
    _usp.FAST_PATH = False
    res["call_no_fast_path"] = host_us(lambda: xdit_ops.usp_attention(q, k, v))
    _usp.FAST_PATH = True
    res["groups"] = host_us(lambda: _usp._groups_from(None))
    res["fast_key"] = host_us(
        lambda: _usp._fast_key(q, k, v, 0, "front", None, None, None, "auto", u, r, False,
                               None))
    res["resolve_group"] = host_us(lambda: _usp._resolve_group(u or r))
    res["switches"] = host_us(lambda: _usp._switches(True))
    res["plain"] = host_us(lambda: plain_call(q, k, v))
    if state is not None:
        run, h = _usp._RUN, state.handle
        res["graph_call_run"] = host_us(lambda: run(h, 1, q, k, v))
        res["graph_call_run_no_output"] = host_us(lambda: run(h, 0, q, k, v))
        res["cudagraph_replay"] = host_us(state.graph.replay)
    res["empty_like"] = host_us(lambda: torch.empty_like(q))
    res["aten_floor"] = host_us(lambda: torch.ops.aten.alias.default(q))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=bshd_shape, default=(1, 4608, 24, 128))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    B, S, H, D = args.shape
    rows = []
    for name, (u, r) in (("ulysses", (world, 1)), ("ring", (1, world))):
        _usp.release_call_graphs()
        xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r)
        g = torch.Generator(device="cuda").manual_seed(rank)
        q, k, v = (torch.randn(B, S // world, H, D, device="cuda", generator=g,
                               dtype=torch.bfloat16) for _ in range(3))
        row = {"shape": [B, S, H, D], "config": name, "gpus": world} | pieces(q, k, v)
        rows.append(row)
    if rank == 0:
        cols = [c for c in rows[0] if c not in ("shape", "gpus")]
        print_table(rows, cols, floatfmt=".1f")
        print(f"wrote {write_json('bench_usp_host', rows, args.out, extra={'gpus_used': world})}")
    xdit_ops.destroy_parallel()


if __name__ == "__main__":
    main()
