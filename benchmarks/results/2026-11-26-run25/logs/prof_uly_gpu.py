# ruff: noqa: B023, E501  (kept as run in run 25: each closure is used inside its loop iteration)
"""GPU-side breakdown of one eager Ulysses usp_attention call on 2 GPUs (run 25), and what
an SM-driven push into a peer's symmetric-memory buffer costs next to NCCL's all-to-all at the
same sizes. Usage: torchrun --nproc-per-node=2 prof_uly_gpu.py"""

import os

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
from torch.profiler import ProfilerActivity, profile

import xdit_ops

local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
w = int(os.environ["WORLD_SIZE"])
xdit_ops.init_parallel(ulysses_degree=w)
rank = dist.get_rank()


def timed(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n * 1e3  # us


for S, H in ((4608, 24), (16896, 24)):
    q, k, v = (torch.randn(1, S // w, H, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    f = lambda: xdit_ops.usp_attention(q, k, v)  # noqa: E731
    us = timed(f)
    # single-GPU attention on this rank's share of heads over the whole sequence
    qa, ka, va = (torch.randn(1, S, H // w, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ua = timed(lambda: xdit_ops.attention(qa, ka, va))
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            f()
        torch.cuda.synchronize()
    if rank == 0:
        print(f"=== S={S} H={H}: usp Ulysses x{w} {us:.1f} us per call (back to back); "
              f"local attention alone (S, H/{w}) {ua:.1f} us")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14,
                                        max_name_column_width=60))
    # transport microbenchmarks at this shape's Ulysses input size (Q, K, V of one rank)
    nbytes = 3 * q.numel() * q.element_size()
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    u_a2a = timed(lambda: dist.all_to_all_single(dst, src))
    buf = symm_mem.empty(src.numel(), dtype=src.dtype, device="cuda")
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
    peer = (rank + 1) % w
    half = src.numel() // w
    pbuf = hdl.get_buffer(peer, (src.numel(),), src.dtype)
    off = rank * half

    def push():  # what all_to_all_single moves to the peer, written by SMs over NVLink
        pbuf[off:off + half].copy_(src[peer * half:(peer + 1) * half])
        buf[off:off + half].copy_(src[off:off + half])  # own part stays local
        hdl.barrier(channel=0)

    u_push = timed(push)
    u_bar = timed(lambda: hdl.barrier(channel=0))
    u_local = timed(lambda: dst.copy_(src))
    if rank == 0:
        mb = nbytes / 1e6
        print(f"transport, {mb:.1f} MB per rank ({mb / w * (w - 1):.1f} MB leave): "
              f"NCCL all_to_all_single {u_a2a:.1f} us; SM push to peer + local copy + symm "
              f"barrier {u_push:.1f} us; symm barrier alone {u_bar:.1f} us; local copy of all "
              f"{u_local:.1f} us")
dist.destroy_process_group()
