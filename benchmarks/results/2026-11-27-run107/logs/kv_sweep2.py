"""Session 20, run 107: the pass's K/V work with the sampled statistics, fused (V's exact amax
carried in V's dtype, v_track 1, main; or in fp32, 2) or as two launches (V's tiles, then K's)
at several warps / programs per SM. The pass as the sm90ws op runs it (V^T in the P.V key order,
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
CONFIGS = {"main": {}, "track_f32": dict(v_track=2)}
for vw, vp, kw, kp in [(4, 2, 4, 2), (4, 4, 8, 1), (8, 1, 8, 2), (8, 2, 16, 1), (16, 1, 4, 4)]:
    CONFIGS[f"split_v{vw}x{vp}_k{kw}x{kp}"] = dict(kv_split=True, v_warps=vw, v_per_sm=vp,
                                                   k_warps=kw, k_per_sm=kp)
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
(out_dir / "kv_sweep2.json").write_text(json.dumps(res, indent=1))
