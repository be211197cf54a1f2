# ruff: noqa
"""Host time (us) of each step of the push's eager call at (1,4608,24,128) bf16 on N GPUs, the
GPU kept busy so that nothing waits for it: the op (torch.ops dispatch + _usp_impl), and inside the push (an instrumented copy of _ulysses_push, the same calls):
buffer lookup, ulysses_push_qkv, barrier, attention, ulysses_push_out, barrier, clone."""
import collections, importlib, os, statistics, time
import torch, torch.distributed as dist
import xdit_ops

U = importlib.import_module("xdit_ops.ops.usp_attention")
local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
rank, world = dist.get_rank(), dist.get_world_size()
T = collections.defaultdict(list)
pc = time.perf_counter

def push_timed(q_s, k_s, v_s, q_j, k_j, v_j, p, attend):
    t0 = pc(); qbuf, kv, outbuf, ins, outs, handle = U._push_buffers(p, q_s.dtype, q_s.device)
    t1 = pc(); torch.ops.xdit_ops.ulysses_push_qkv.default(q_s, k_s, v_s, p.heads, ins, p.u_rank, p.J, p.Jk)
    t2 = pc(); handle.barrier(channel=0)
    t3 = pc(); o, lse = attend(qbuf, U._squeezed(p, kv) if p.squeeze else kv, None, None)
    t4 = pc(); torch.ops.xdit_ops.ulysses_push_out.default(o, p.heads, outs, p.u_rank, p.L, p.joint_front)
    t5 = pc(); handle.barrier(channel=0)
    t6 = pc(); r = outbuf.clone()
    t7 = pc()
    for n, a, b in (("buffers", t0, t1), ("push_qkv", t1, t2), ("barrier1", t2, t3), ("attend", t3, t4),
                    ("push_out", t4, t5), ("barrier2", t5, t6), ("clone", t6, t7), ("push_total", t0, t7)):
        T[n].append((b - a) * 1e6)
    return r, lse

B, S, H, D = 1, 4608, 24, 128
xdit_ops.init_parallel(ulysses_degree=world, ring_degree=1)
g = torch.Generator(device="cuda"); g.manual_seed(0)
q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
sh = [xdit_ops.shard_sequence(t)[0] for t in (q, k, v)]
ref = xdit_ops.usp_attention(*sh, seq_len=S)
U._ulysses_push = push_timed
out = xdit_ops.usp_attention(*sh, seq_len=S)
assert torch.equal(out, ref), "instrumented push differs"
st = xdit_ops.get_parallel_state()
for _ in range(3):
    torch.cuda.synchronize(); dist.barrier(); T.clear()
    torch.cuda._sleep(int(2e9))
    for _ in range(40):
        t0 = pc(); xdit_ops.usp_attention(*sh, seq_len=S); T["op"].append((pc() - t0) * 1e6)
    torch.cuda.synchronize()
res = {n: round(statistics.median(v), 1) for n, v in T.items()}
allr = [None] * world
dist.all_gather_object(allr, res)
if rank == 0:
    for r_, d in enumerate(allr):
        print(f"rank {r_}: " + ", ".join(f"{n} {x}" for n, x in d.items()), flush=True)
dist.destroy_process_group()
