"""Where a parallel Flux VAE decode's peak memory goes (diagnostic, run 18).

Under torchrun: every rank decodes its row band of a Flux ``AutoencoderKL`` (bench_vae's
config, random weights, bf16) once to warm up, then once more with rank 0 recording its CUDA
allocations (``torch.cuda.memory._record_memory_history``). Rank 0 replays the trace to the
moment of the highest allocated total and prints the blocks live then: the largest ones with
the Python line that allocated them, and totals per allocating line.

    torchrun --nproc-per-node=2 vae_mem_probe.py [latent_side=512]
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(os.environ.get("XDIT_OPS_REPO", Path(__file__).resolve().parents[4]))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from bench_vae import _decode, flux_vae  # noqa: E402

import xdit_ops  # noqa: E402

GIB = 1024 ** 3


def _where(frames: list[dict]) -> str:
    keep = [f for f in frames if "xdit_ops" in f["filename"] or "diffusers" in f["filename"]]
    f = (keep or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{Path(f['filename']).name}:{f['line']} {f['name']}"


def _peak_blocks(snap: dict, device: int) -> tuple[int, dict]:
    live: dict[int, tuple[int, str]] = {}
    cur = best = 0
    best_live: dict = {}
    for e in snap["device_traces"][device]:
        act = e["action"]
        if act == "alloc":
            live[e["addr"]] = (e["size"], _where(e.get("frames", [])))
            cur += e["size"]
            if cur > best:
                best, best_live = cur, dict(live)
        elif act in ("free_completed",) and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    return best, best_live


def main() -> None:
    side = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    xdit_ops.init_parallel(ulysses_degree=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    group = xdit_ops.get_parallel_state().sp_group
    torch.manual_seed(0)
    vae = flux_vae().to("cuda", torch.bfloat16).eval()
    z = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(1)).to(
        "cuda", torch.bfloat16)
    xdit_ops.parallelize_vae(vae, group=group)
    with torch.no_grad():
        _decode(vae, z)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if rank == 0:
            torch.cuda.memory._record_memory_history(max_entries=500000, stacks="python")
        t0 = time.perf_counter()
        out = _decode(vae, z)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated() - base
    print(f"rank {rank}: decode {ms:.0f} ms (recording on rank 0), activation peak "
          f"{peak / GIB:.2f} GiB, output {tuple(out.shape)}, "
          f"CUDNN_CONV_WSCAP_DBG={os.environ.get('CUDNN_CONV_WSCAP_DBG')}", flush=True)
    if rank == 0:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        best, live = _peak_blocks(snap, torch.cuda.current_device())
        print(f"replayed trace peak (allocations made during the decode): {best / GIB:.2f} GiB "
              f"in {len(live)} blocks")
        by_line: collections.Counter = collections.Counter()
        for size, where in live.values():
            by_line[where] += size
        print("largest live blocks at the peak:")
        for size, where in sorted(live.values(), reverse=True)[:15]:
            print(f"  {size / GIB:7.3f} GiB  {where}")
        print("live bytes at the peak per allocating line:")
        for where, size in by_line.most_common(15):
            print(f"  {size / GIB:7.3f} GiB  {where}")
    dist.barrier()
    xdit_ops.destroy_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
