# ruff: noqa
"""Where the 4-GPU Ulysses overlap's time goes at (1,32760,40,128) (session 16).

All ranks at once, each on its GPU: cuDNN attention alone on the op's per-chunk buffer shapes
(10 heads whole; the overlap's chunks 1,4,4,1 one after the other), the 40-head single-GPU
call (T1) on every GPU at once, then torch.profiler of 3 eager usp_attention calls under the
overlap (default chunks) and under the push: per call the GPU span (first event start to last
event end, any stream), the attention kernels' summed time and the time before the first and
after the last of them. Writes prof_overlap32k.json (rank 0 and the other ranks' summaries)."""
import json, os, statistics, time
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
import xdit_ops

local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
rank, world = dist.get_rank(), dist.get_world_size()
out_dir = os.environ.get("PROF_OUT", "/tmp")
B, S, H, D = 1, int(os.environ.get("PS", "32760")), int(os.environ.get("PH", "40")), 128
h = H // world
CH = [int(x) for x in os.environ.get("PCH", "1,4,4,1").split(",")]


def sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2))


def t_ms(fn, n=5):
    for _ in range(2):
        fn()
    torch.cuda.synchronize(); dist.barrier()
    ts = []
    for _ in range(n):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); fn(); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1))
    return statistics.median(ts)


g = torch.Generator(device="cuda"); g.manual_seed(rank)
rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)
res = {"rank": rank}
qkv = [rnd(B, S, h, D) for _ in range(3)]
res["attn_whole_ms"] = t_ms(lambda: sdpa(*qkv))
chunks = [[rnd(B, S, c, D) for _ in range(3)] for c in CH]
res["attn_chunks_ms"] = [t_ms(lambda c=c: sdpa(*c)) for c in chunks]
res["attn_chunked_ms"] = t_ms(lambda: [sdpa(*c) for c in chunks])
del qkv, chunks
full = [rnd(B, S, H, D) for _ in range(3)]
res["t1_all_gpus_ms"] = t_ms(lambda: sdpa(*full), n=3)
del full
torch.cuda.empty_cache()

xdit_ops.init_parallel(ulysses_degree=world, ring_degree=1)
gen = torch.Generator(device="cuda"); gen.manual_seed(0)
q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
sh = [xdit_ops.shard_sequence(t)[0] for t in (q, k, v)]
del q, k, v
f = lambda: xdit_ops.usp_attention(*sh, seq_len=S)

ATT = ("sdpa", "fprop", "flash", "fmha", "attn")


def analyse(path):
    ev = json.load(open(path))["traceEvents"]
    gpu = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                  and "dur" in e), key=lambda e: e["ts"])
    calls, cur = [], []
    for e in gpu:
        if cur and e["ts"] > max(x["ts"] + x["dur"] for x in cur) + 1000:
            calls.append(cur); cur = []
        cur.append(e)
    if cur:
        calls.append(cur)
    out = []
    for c in calls:
        t0 = c[0]["ts"]; t1 = max(x["ts"] + x["dur"] for x in c)
        att = [x for x in c if x.get("cat") == "kernel" and any(a in x["name"].lower() for a in ATT)]
        row = {"span_us": t1 - t0, "events": len(c)}
        if att:
            a0 = min(x["ts"] for x in att); a1 = max(x["ts"] + x["dur"] for x in att)
            row.update(attn_sum_us=sum(x["dur"] for x in att), attn_n=len(att),
                       before_first_attn_us=a0 - t0, after_last_attn_us=t1 - a1,
                       attn_durs_us=[round(x["dur"], 1) for x in att],
                       attn_gaps_us=[round(att[i + 1]["ts"] - att[i]["ts"] - att[i]["dur"], 1)
                                     for i in range(len(att) - 1)])
        names = {}
        for x in c:
            n = x["name"][:70]; d = names.setdefault(n, [0, 0.0]); d[0] += 1; d[1] += x["dur"]
        row["by_name"] = sorted(([n, k_, round(t, 1)] for n, (k_, t) in names.items()), key=lambda r: -r[2])[:12]
        # what runs before the first attention, in order (name, start offset, dur, stream)
        row["head"] = [[x["name"][:50], round(x["ts"] - t0, 1), round(x["dur"], 1), x.get("args", {}).get("stream")]
                       for x in c if not att or x["ts"] < min(y["ts"] for y in att)][:12]
        row["tail"] = [[x["name"][:50], round(x["ts"] - t0, 1), round(x["dur"], 1), x.get("args", {}).get("stream")]
                       for x in c if att and x["ts"] + x["dur"] > max(y["ts"] + y["dur"] for y in att)][:16]
        out.append(row)
    return out


for mode in ("overlap", "push"):
    os.environ["XDIT_OPS_USP_ULYSSES"] = mode
    res[f"{mode}_ms"] = t_ms(f)
    torch.cuda.synchronize(); dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            f(); torch.cuda.synchronize(); time.sleep(0.005)
    path = os.path.join(out_dir, f"trace_{mode}_{S}_r{rank}.json")
    prof.export_chrome_trace(path)
    res[f"{mode}_calls"] = analyse(path)
    if rank != 0:
        os.remove(path)
    dist.barrier()

allr = [None] * world
dist.all_gather_object(allr, res)
if rank == 0:
    for r in allr:
        print(f"rank {r['rank']}: attn whole {r['attn_whole_ms']:.3f} chunks {[round(x, 3) for x in r['attn_chunks_ms']]} "
              f"chunked {r['attn_chunked_ms']:.3f} T1(all GPUs) {r['t1_all_gpus_ms']:.3f} (T1/{world} {r['t1_all_gpus_ms'] / world:.3f}) "
              f"overlap {r['overlap_ms']:.3f} push {r['push_ms']:.3f}", flush=True)
        for m in ("overlap", "push"):
            for c in r[f"{m}_calls"]:
                print(f"  {m}: span {c['span_us']:.0f} attn {c.get('attn_sum_us', 0):.0f} x{c.get('attn_n')} "
                      f"before {c.get('before_first_attn_us', 0):.0f} after {c.get('after_last_attn_us', 0):.0f} "
                      f"gaps {c.get('attn_gaps_us')} durs {c.get('attn_durs_us')}", flush=True)
    for m in ("overlap", "push"):
        c = allr[0][f"{m}_calls"][-1]
        print(f"rank 0 {m} last call by name:", flush=True)
        for n, k_, t in c["by_name"]:
            print(f"   {t:9.1f} us x{k_} {n}", flush=True)
        print("  head:", c["head"], flush=True)
        print("  tail:", c["tail"], flush=True)
    json.dump({"gpu": torch.cuda.get_device_name(), "world": world, "shape": [B, S, H, D],
               "chunks": CH, "torch": torch.__version__, "ranks": allr},
              open(os.path.join(out_dir, "prof_overlap32k.json"), "w"), indent=1)
xdit_ops.destroy_parallel()
dist.destroy_process_group()
