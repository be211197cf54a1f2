# ruff: noqa
# torch.profiler of one rank's usp_attention at (1,S,H,128) over 4 GPUs: the push path and the
# overlap path (c2), eager, after warm-up; kernel/memcpy summary per stream on rank 0.
import os, sys, json, torch, torch.distributed as dist
import xdit_ops
from torch.profiler import profile, ProfilerActivity
local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
S, H = int(os.environ.get("PS", "16896")), int(os.environ.get("PH", "24"))
out = sys.argv[1]
g = torch.Generator(device="cuda"); g.manual_seed(1)
q, k, v = (torch.randn(1, S, H, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
xdit_ops.init_parallel(ulysses_degree=dist.get_world_size(), ring_degree=1)
shards = [xdit_ops.shard_sequence(t)[0] for t in (q, k, v)]
for mode in ("push", "overlap"):
    os.environ["XDIT_OPS_USP_ULYSSES"] = mode
    os.environ["XDIT_OPS_USP_CHUNKS"] = "2"
    for _ in range(5):
        xdit_ops.usp_attention(*shards, seq_len=S)
    torch.cuda.synchronize(); dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            xdit_ops.usp_attention(*shards, seq_len=S)
        torch.cuda.synchronize()
    if dist.get_rank() == 0:
        print(f"=== {mode} S={S}", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
        prof.export_chrome_trace(os.path.join(out, f"trace_{mode}_{S}.json"))
    dist.barrier()
dist.destroy_process_group()
