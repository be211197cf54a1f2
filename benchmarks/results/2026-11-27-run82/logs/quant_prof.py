"""Branch fp8-epi-next: the FP8 quantization pass's kernels one by one (torch.profiler CUDA
times, mean of 20 calls) at the issue's shapes, with the bytes each moves and its GB/s, and the
pass's host time per call (median, GPU kept busy).
Usage: python quant_prof.py OUT_DIR B,S,H,D ..."""
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from xdit_ops.reference.fp8_attention import dit_like_qkv
from xdit_ops.triton.fp8_attention import quantize_qkv_triton

out_dir = Path(sys.argv[1])
rows = []
for B, S, H, D in (tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]):
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    Dp = 64 if D <= 64 else 128

    def run(q=q, k=k, v=v):
        return quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128)
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    n = 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            run()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            per[e.key] = e.self_device_time_total / n
    tok = B * S * H
    bf = tok * D * 2  # one bf16 tensor
    moved = {"kv_stats_kernel": 2 * bf, "quantize_q_kernel": bf + tok * Dp + 8 * tok,
             "quantize_kv_kernel": 2 * bf + 2 * tok * Dp + 4 * tok}
    # host time of one pass, queued behind a GPU sleep
    hs = []
    for _ in range(30):
        torch.cuda._sleep(int(2e7))
        t0 = time.perf_counter()
        run()
        hs.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    row = {"B": B, "S": S, "H": H, "D": D, "host_us": statistics.median(hs)}
    for name, us in sorted(per.items(), key=lambda x: -x[1]):
        short = next((m for m in moved if m in name), name[:60])
        row[f"{short}_us"] = us
        if short in moved:
            row[f"{short}_GBps"] = moved[short] / (us * 1e-6) / 1e9
    rows.append(row)
    print(json.dumps(row), flush=True)
    del q, k, v, run
    torch.cuda.empty_cache()
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"quant_prof-{torch.cuda.get_device_name().replace(' ', '_')}.json").write_text(
    json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
