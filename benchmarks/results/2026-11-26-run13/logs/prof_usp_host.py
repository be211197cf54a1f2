"""Where the host time of one eager usp_attention call goes (run 13, kept as the source of
prof_usp_*.log): cProfile and the torch profiler over eager calls at (1, 4608, 24, 128) while
the GPU is busy. Usage: torchrun --nproc-per-node=2 prof_usp_host.py ulysses|ring"""

import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import xdit_ops

cfg = sys.argv[1]  # ulysses | ring
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
w = int(os.environ["WORLD_SIZE"])
uly = cfg == "ulysses"
xdit_ops.init_parallel(ulysses_degree=w if uly else 1, ring_degree=1 if uly else w)
S = 4608 // w
q, k, v = (torch.randn(1, S, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))


def f():
    return xdit_ops.usp_attention(q, k, v)


for _ in range(5):
    f()
torch.cuda.synchronize()
dist.barrier()
torch.cuda._sleep(int(6e9))
pr = cProfile.Profile()
t0 = time.perf_counter()
pr.enable()
for _ in range(100):
    f()
pr.disable()
t = (time.perf_counter() - t0) / 100 * 1e6
torch.cuda.synchronize()
if dist.get_rank() == 0:
    print(f"=== {cfg}: {t:.0f} us per call under cProfile")
    for order, n in (("tottime", 35), ("cumulative", 45)):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(order).print_stats(n)
        print(s.getvalue())
torch.cuda.synchronize()
dist.barrier()
torch.cuda._sleep(int(3e9))
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(20):
        f()
torch.cuda.synchronize()
if dist.get_rank() == 0:
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
torch.cuda.synchronize()
dist.barrier()
torch.cuda._sleep(int(2e9))
ts = []
for _ in range(50):
    t0 = time.perf_counter()
    f()
    ts.append((time.perf_counter() - t0) * 1e6)
ts.sort()
if dist.get_rank() == 0:
    print(f"=== {cfg}: plain host us per call: median {ts[25]:.0f} min {ts[0]:.0f}")
torch.cuda.synchronize()
xdit_ops.destroy_parallel()
