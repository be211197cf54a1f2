# ruff: noqa
"""Where the 4-GPU Ulysses (push) time goes: torch.profiler on every rank of the default
usp_attention (eager, then from a CUDA graph is not profiled), per shape: the CUDA kernels with
their total device time per call, the GPU span of one call (first kernel start to last kernel
end on any stream) and the busy time of the union of kernels. Writes prof_push.json and rank 0's
chrome trace of the largest shape."""
import json, os, sys, time
import torch, torch.distributed as dist
import xdit_ops
from torch.profiler import profile, ProfilerActivity

local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
rank, world = dist.get_rank(), dist.get_world_size()
out_dir = os.environ.get("PROF_OUT", "/tmp")
res = []
for (B, S, H, D) in ((1, 4608, 24, 128), (1, 16896, 24, 128), (1, 32760, 40, 128)):
    mode = os.environ.get("PROF_MODE", "ulysses")  # "ring": ring-only grid (default transport)
    xdit_ops.init_parallel(ulysses_degree=1 if mode == "ring" else world,
                           ring_degree=world if mode == "ring" else 1)
    g = torch.Generator(device="cuda"); g.manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    sh = [xdit_ops.shard_sequence(t)[0] for t in (q, k, v)]
    f = lambda: xdit_ops.usp_attention(*sh, seq_len=S)
    for _ in range(5): f()
    torch.cuda.synchronize(); dist.barrier()
    N = 6
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(N):
            f()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kern = {}
    for e in evs:
        d = kern.setdefault(e.name[:90], [0, 0.0]); d[0] += 1; d[1] += e.time_range.elapsed_us()
    rows = sorted(([n, c / N, t / N] for n, (c, t) in kern.items()), key=lambda r: -r[2])
    iv = sorted((e.time_range.start, e.time_range.end) for e in evs)
    busy = 0; cur = None
    for s, t in iv:
        if cur is None or s > cur[1]:
            if cur: busy += cur[1] - cur[0]
            cur = [s, t]
        else: cur[1] = max(cur[1], t)
    if cur: busy += cur[1] - cur[0]
    span = (iv[-1][1] - iv[0][0]) if iv else 0
    # timed (no profiler) for comparison
    torch.cuda.synchronize(); dist.barrier()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10): f()
    e1.record(); torch.cuda.synchronize()
    r = dict(rank=rank, shape=[B, S, H, D], ms_per_call=e0.elapsed_time(e1) / 10,
             prof_span_us_per_call=span / N, prof_busy_us_per_call=busy / N, kernels=rows[:16])
    allr = [None] * world
    dist.all_gather_object(allr, r)
    if rank == 0:
        res.append(allr)
        print(json.dumps({k: v for k, v in allr[0].items() if k != "kernels"}), flush=True)
        for rr in allr:
            print(" rank", rr["rank"], "ms", round(rr["ms_per_call"], 3), "span", round(rr["prof_span_us_per_call"]), "busy", round(rr["prof_busy_us_per_call"]))
        for n, c, t in allr[0]["kernels"]:
            print(f"   {t:9.1f} us x{c:.1f} {n}")
        if S == 32760:
            prof.export_chrome_trace(os.path.join(out_dir, f"{mode}_32760_rank0.json"))
    del q, k, v, sh
if rank == 0:
    json.dump({"gpu": torch.cuda.get_device_name(), "world": world, "torch": torch.__version__,
               "results": res}, open(os.path.join(out_dir, f"prof_{os.environ.get('PROF_MODE', 'ulysses')}.json"), "w"), indent=1)
dist.destroy_process_group()
