# ruff: noqa
"""The 4-GPU Ulysses overlap at (1,32760,40,128) in back-to-back calls (session 16, run 74).

All ranks at once. Per mode (the overlap with ATTEND_FIRST True and False, the push): bench-style
timing (events around each call, 20 calls queued back to back after warm-up: median, and the
mean period first event to last), a single call after a synchronize (as run 73's t_ms), and
torch.profiler of 6 back-to-back calls: per call the period between the starts of consecutive
first attentions, the attention time in it, and the compute stream's idle time between the last
attention of a call and the first of the next (what ran there). Writes prof_b2b.json."""
import json, os, statistics, time
import torch, torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
import xdit_ops
import importlib
usp_mod = importlib.import_module("xdit_ops.ops.usp_attention")

local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
rank, world = dist.get_rank(), dist.get_world_size()
out_dir = os.environ.get("PROF_OUT", "/tmp")
B, S, H, D = 1, int(os.environ.get("PS", "32760")), int(os.environ.get("PH", "40")), 128
xdit_ops.init_parallel(ulysses_degree=world, ring_degree=1)
gen = torch.Generator(device="cuda"); gen.manual_seed(0)
q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
sh = [xdit_ops.shard_sequence(t)[0] for t in (q, k, v)]
del q, k, v
f = lambda: xdit_ops.usp_attention(*sh, seq_len=S)


def b2b_ms(n=20):
    for _ in range(3):
        f()
    torch.cuda.synchronize(); dist.barrier()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); f(); b.record()
    torch.cuda.synchronize()
    ts = [a.elapsed_time(b) for a, b in ev]
    return statistics.median(ts), ev[0][0].elapsed_time(ev[-1][1]) / n


def single_ms(n=5):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def analyse(path, per_call):
    ev = json.load(open(path))["traceEvents"]
    gpu = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e), key=lambda e: e["ts"])
    att = [e for e in gpu if "sdpa" in e["name"] or "fprop" in e["name"]]
    cs = att[0]["args"].get("stream")
    comp = [e for e in gpu if e["args"].get("stream") == cs]
    calls = [att[i:i + per_call] for i in range(0, len(att) - per_call + 1, per_call)]
    rows = []
    for i in range(len(calls) - 1):
        a, nxt = calls[i], calls[i + 1]
        last_end = a[-1]["ts"] + a[-1]["dur"]
        between = [[e["name"][:40], round(e["ts"] - last_end, 1), round(e["dur"], 1)] for e in comp
                   if last_end <= e["ts"] < nxt[0]["ts"]]
        inner_gaps = [round(a[j + 1]["ts"] - a[j]["ts"] - a[j]["dur"], 1) for j in range(len(a) - 1)]
        rows.append(dict(period_us=round(nxt[0]["ts"] - a[0]["ts"], 1), attn_us=round(sum(e["dur"] for e in a), 1),
                         inner_gaps_us=inner_gaps, idle_between_us=round(nxt[0]["ts"] - last_end, 1),
                         busy_between_us=round(sum(e["dur"] for e in comp if last_end <= e["ts"] < nxt[0]["ts"]), 1),
                         between=between))
    return rows


res = {"rank": rank}
modes = [("overlap_af", "overlap", True), ("overlap_old", "overlap", False), ("push", "push", True),
         ("overlap_af2", "overlap", True)]
for name, tr, af in modes:
    os.environ["XDIT_OPS_USP_ULYSSES"] = tr
    usp_mod.ATTEND_FIRST = af
    med, per = b2b_ms()
    res[name] = dict(b2b_median_ms=med, b2b_period_ms=per, single_ms=single_ms())
    if name == "overlap_af2":
        continue
    torch.cuda.synchronize(); dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(6):
            f()
        torch.cuda.synchronize()
    path = os.path.join(out_dir, f"trace_b2b_{name}_r{rank}.json")
    prof.export_chrome_trace(path)
    res[name]["calls"] = analyse(path, 1 if tr == "push" else 4)
    if rank != 0:
        os.remove(path)
    dist.barrier()

allr = [None] * world
dist.all_gather_object(allr, res)
if rank == 0:
    for r in allr:
        print(f"rank {r['rank']}: " + "  ".join(f"{n}: b2b {r[n]['b2b_median_ms']:.3f} (period {r[n]['b2b_period_ms']:.3f}) single {r[n]['single_ms']:.3f}" for n, _, _ in modes), flush=True)
        for n, _, _ in modes[:3]:
            for c in r[n]["calls"]:
                print(f"   {n}: period {c['period_us']} attn {c['attn_us']} inner {c['inner_gaps_us']} idle_between {c['idle_between_us']} busy_between {c['busy_between_us']}", flush=True)
    for n, _, _ in modes[:3]:
        print(f"rank 0 {n} between calls:", allr[0][n]["calls"][-1]["between"], flush=True)
    json.dump({"gpu": torch.cuda.get_device_name(), "world": world, "shape": [B, S, H, D], "torch": torch.__version__, "ranks": allr},
              open(os.path.join(out_dir, "prof_b2b.json"), "w"), indent=1)
xdit_ops.destroy_parallel()
