"""Where the FP8 op's time goes beyond its kernels: torch.profiler over back-to-back calls of
xdit_ops.fp8_attention at one shape; per call the kernels' durations in stream order and the
idle gaps between them (GPU time not covered by any kernel), medians over the calls.
Usage: python gaps.py OUT_DIR B,S,H,D [...]"""
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import xdit_ops
from xdit_ops.reference.fp8_attention import dit_like_qkv

out_dir = Path(sys.argv[1])
res = {}
for B, S, H, D in (tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]):
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    for _ in range(5):
        xdit_ops.fp8_attention(q, k, v)
    torch.cuda.synchronize()
    n = 12
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            xdit_ops.fp8_attention(q, k, v)
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                 key=lambda e: e.time_range.start)
    names = [e.name for e in evs]
    per = len(evs) // n
    calls = [evs[i * per:(i + 1) * per] for i in range(n)]
    rows = []
    for c in calls[2:]:  # (the first calls after the profiler starts are left out)
        row = {"kernels": [(e.name[:60], e.time_range.end - e.time_range.start) for e in c]}
        row["gaps"] = [c[i + 1].time_range.start - c[i].time_range.end for i in range(per - 1)]
        row["span"] = c[-1].time_range.end - c[0].time_range.start
        rows.append(row)
    summary = {
        "kernels_per_call": per,
        "kernel_us": [(rows[0]["kernels"][j][0], statistics.median(r["kernels"][j][1]
                                                                    for r in rows))
                      for j in range(per)],
        "gap_us": [statistics.median(r["gaps"][j] for r in rows) for j in range(per - 1)],
        "span_us": statistics.median(r["span"] for r in rows),
        "between_calls_us": statistics.median(
            calls[i + 1][0].time_range.start - calls[i][-1].time_range.end
            for i in range(2, n - 1)),
    }
    res[f"{B},{S},{H},{D}"] = summary
    print((B, S, H, D), json.dumps(summary, indent=1), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "fp8_gaps.json").write_text(json.dumps(res, indent=1))
