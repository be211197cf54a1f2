"""Session 20, run 108 (run 107's kv_sweep2.py with other configurations): the pass's K/V work
with the sampled statistics as two launches (V's tiles, then K's), V's launch at several warps /
programs per SM / V-loop stages with K's at 8 warps x 2 (run 107's best), and K's at several
with V's at 8 x 1; main (fused) for reference; v_repair_kernel on one program per head.
The pass as the sm90ws op runs it (V^T in the P.V key order,
one K scale per 128-key tile); torch.profiler over 10 calls, each kernel's median GPU time;
outputs compared with main's config bit for bit.
Usage: python kv_sweep2.py OUT_DIR B,S,H,D [...]"""
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import xdit_ops.triton.fp8_attention as launcher
from xdit_ops.reference.fp8_attention import cached_hadamard, dit_like_qkv, padded_head_dim

out_dir = Path(sys.argv[1])
CONFIGS = {"main": {}}
SPLIT = dict(kv_split=True, v_warps=8, v_per_sm=1, k_warps=8, k_per_sm=2)
for name, cfg in [("v8x1s3_k8x2s3", {}), ("v8x1s4", dict(v_stages=4)), ("v8x1s2", dict(v_stages=2)),
                  ("v4x2s3", dict(v_warps=4, v_per_sm=2)),
                  ("v4x2s4", dict(v_warps=4, v_per_sm=2, v_stages=4)),
                  ("v4x3s3", dict(v_warps=4, v_per_sm=3)), ("v8x2s3", dict(v_per_sm=2)),
                  ("k8x2s4", dict(kv_stages=4)), ("k8x2s2", dict(kv_stages=2)),
                  ("k4x2s3", dict(k_warps=4)), ("k4x3s3", dict(k_warps=4, k_per_sm=3)),
                  ("k8x1s4", dict(k_per_sm=1, kv_stages=4)),
                  ("k16x1s3", dict(k_warps=16, k_per_sm=1))]:
    CONFIGS[name] = SPLIT | cfg
res = {}
for B, S, H, D in (tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]):
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    DP = padded_head_dim(D)
    had = cached_hadamard(DP, q.dtype, q.device)
    base_launch = launcher.QUANT_LAUNCH[DP]
    ref = None
    rows = {}
    for rnd in range(2):
        for name, cfg in CONFIGS.items():
            launcher.QUANT_LAUNCH[DP] = base_launch._replace(**cfg)
            try:
                call = functools.partial(launcher._quantize, q, k, v, had, D ** -0.5,
                                         vt_pv_order=True, k_block=128)
                outs = call()
                if ref is None:
                    ref = [t.clone() for t in outs]
                same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                           for a, b in zip(ref, outs, strict=True))
                for _ in range(3):
                    call()
                torch.cuda.synchronize()
                n = 10
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(n):
                        call()
                    torch.cuda.synchronize()
                evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                             key=lambda e: e.time_range.start)
                per = len(evs) // n
                ks = [(evs[j].name[:24], statistics.median(
                    evs[i * per + j].time_range.end - evs[i * per + j].time_range.start
                    for i in range(1, n))) for j in range(per)]
                span = statistics.median(evs[i * per + per - 1].time_range.end
                                         - evs[i * per].time_range.start for i in range(1, n))
                rows.setdefault(name, []).append({"kernels_us": ks, "span_us": span,
                                                  "same_bits": same})
                print((B, S, H, D), rnd, name, "same" if same else "DIFFERENT",
                      f"span {span:.1f}", [(a, round(b, 1)) for a, b in ks], flush=True)
            finally:
                launcher.QUANT_LAUNCH[DP] = base_launch
    res[f"{B},{S},{H},{D}"] = rows
    del q, k, v
    torch.cuda.empty_cache()
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "kv_sweep3.json").write_text(json.dumps(res, indent=1))
