# call-script tool (not committed): where the host time of one eager usp_attention call goes
import cProfile, io, os, pstats, sys, time
import torch, torch.distributed as dist
import xdit_ops
cfg = sys.argv[1]  # ulysses | ring
local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
w = int(os.environ["WORLD_SIZE"])
xdit_ops.init_parallel(ulysses_degree=w if cfg == "ulysses" else 1, ring_degree=1 if cfg == "ulysses" else w)
S = 4608 // w
q, k, v = (torch.randn(1, S, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
f = lambda: xdit_ops.usp_attention(q, k, v)
for _ in range(5): f()
torch.cuda.synchronize(); dist.barrier()
torch.cuda._sleep(int(6e9))
pr = cProfile.Profile()
t0 = time.perf_counter()
pr.enable()
for _ in range(100): f()
pr.disable()
t = (time.perf_counter() - t0) / 100 * 1e6
torch.cuda.synchronize()
if dist.get_rank() == 0:
    print(f"=== {cfg}: {t:.0f} us per call under cProfile")
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35); print(s.getvalue())
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45); print(s.getvalue())
torch.cuda.synchronize(); dist.barrier()
torch.cuda._sleep(int(3e9))
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(20): f()
torch.cuda.synchronize()
if dist.get_rank() == 0:
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
torch.cuda.synchronize(); dist.barrier()
torch.cuda._sleep(int(2e9))
ts = []
for _ in range(50):
    t0 = time.perf_counter(); f(); ts.append((time.perf_counter() - t0) * 1e6)
ts.sort()
if dist.get_rank() == 0:
    print(f"=== {cfg}: plain host us per call: median {ts[25]:.0f} min {ts[0]:.0f}")
torch.cuda.synchronize()
xdit_ops.destroy_parallel()
