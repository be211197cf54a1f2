# ruff: noqa
"""Host time of one eager usp_attention call on N GPUs at (1,4608,24,128) bf16, per transport
(push = default Ulysses, nccl Ulysses, ring ce, ring nccl): perf_counter per call while the GPU
is kept busy (no call waits for it), then cProfile of 100 calls (rank 0: top functions by own
time). Where the push's ~220-290 us of host time goes (issue 3's 20 us target)."""
import cProfile, io, os, pstats, statistics, time
import torch, torch.distributed as dist
import xdit_ops

local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
rank, world = dist.get_rank(), dist.get_world_size()
B, S, H, D = 1, 4608, 24, 128
g = torch.Generator(device="cuda"); g.manual_seed(0)
q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
for name, u, r, env in (("push", world, 1, {"XDIT_OPS_USP_ULYSSES": "auto"}),
                        ("ulysses-nccl", world, 1, {"XDIT_OPS_USP_ULYSSES": "nccl"}),
                        ("ring-ce", 1, world, {"XDIT_OPS_USP_RING": "ce"}),
                        ("ring-nccl", 1, world, {"XDIT_OPS_USP_RING": "nccl"})):
    for kk in ("XDIT_OPS_USP_ULYSSES", "XDIT_OPS_USP_RING"):
        os.environ.pop(kk, None)
    os.environ.update(env)
    xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r)
    sh = [xdit_ops.shard_sequence(t)[0] for t in (q, k, v)]
    f = lambda: xdit_ops.usp_attention(*sh, seq_len=S)
    for _ in range(5): f()
    torch.cuda.synchronize(); dist.barrier()
    torch.cuda._sleep(int(2e9))
    ts = []
    for _ in range(60):
        t0 = time.perf_counter(); f(); ts.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize(); dist.barrier()
    torch.cuda._sleep(int(4e9))
    pr = cProfile.Profile(); pr.enable()
    for _ in range(100): f()
    pr.disable()
    torch.cuda.synchronize(); dist.barrier()
    if rank == 0:
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(28)
        print(f"=== {name}: host median {statistics.median(ts):.1f} us, min {min(ts):.1f} us per eager call (60 calls, GPU busy)")
        print("\n".join(l[:170] for l in s.getvalue().splitlines()[6:40]), flush=True)

dist.destroy_process_group()
