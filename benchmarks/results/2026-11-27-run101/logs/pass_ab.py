"""The quantization pass alone, GPU time per call, by XDIT_OPS_FP8_PASS (fused / split / three)
and, for fused, by PASS_ROUND_BYTES. Calls are queued behind a GPU sleep (the host is ahead:
the events time the GPU, not the launches); modes interleaved, 3 rounds, median.
Usage: python pass_ab.py OUT_DIR"""
import json
import os
import statistics
import sys
from pathlib import Path

import torch

import xdit_ops.triton.fp8_attention as L
from xdit_ops.reference.fp8_attention import dit_like_qkv

out_dir = Path(sys.argv[1])
SHAPES = [(1, 4608, 24, 128), (1, 16896, 24, 128), (1, 32760, 40, 128), (2, 4250, 24, 64)]
N = 20


def run(q, k, v):
    return L._quantize_qkv(q, k, v, None, True, "e4m3fn", 128, direct=True)


def time_mode(q, k, v, mode, round_bytes=None):
    os.environ[L.PASS_ENV] = mode
    if round_bytes is not None:
        L.PASS_ROUND_BYTES = round_bytes
        L.pass_plan.cache_clear()
    for _ in range(3):
        run(q, k, v)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time: the host queues the calls meanwhile
    a.record()
    for _ in range(N):
        run(q, k, v)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / N


res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("XDIT_OPS_GIT_COMMIT")}
default_bytes = L.PASS_ROUND_BYTES
for B, S, H, D in SHAPES:
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    # the bits: fused == split, and the agreement with three
    outs = {}
    for mode in ("fused", "split", "three"):
        os.environ[L.PASS_ENV] = mode
        qq = run(q, k, v)
        outs[mode] = [qq.q, qq.q_scale, qq.k, qq.k_scale, qq.vt.view(torch.uint8), qq.v_scale,
                      qq.lse_corr]
    same = all(torch.equal(a, b) for a, b in zip(outs["fused"], outs["split"], strict=True))
    kdiff = (outs["fused"][2] != outs["three"][2]).float().mean().item()
    qsame = torch.equal(outs["fused"][0], outs["three"][0]) and torch.equal(
        outs["fused"][4], outs["three"][4])
    del outs
    variants = [("fused", None), ("split", None), ("three", None)] + [
        ("fused", mb << 20) for mb in (16, 24, 48) if mb << 20 != default_bytes]
    times = {f"{m}" + (f"@{rb >> 20}MB" if rb else ""): [] for m, rb in variants}
    for _ in range(3):
        for m, rb in variants:
            name = f"{m}" + (f"@{rb >> 20}MB" if rb else "")
            times[name].append(time_mode(q, k, v, m, rb if rb else default_bytes))
    L.PASS_ROUND_BYTES = default_bytes
    L.pass_plan.cache_clear()
    Sk_pad = -(-S // 64) * 64
    plan = L.pass_plan(B * H, S, S, Sk_pad, D, 2, 128, L.PASS_LAUNCH[max(64, D)].q_block)
    row = {"us": {n: statistics.median(t) for n, t in times.items()},
           "samples": times, "fused_equals_split": same, "k_code_moves_vs_three": kdiff,
           "q_vt_equal_vs_three": qsame, "plan": plan,
           "dram_bytes_ideal": B * S * H * D * 2 * 3 + B * S * H * D * 3}
    res[f"{B},{S},{H},{D}"] = row
    print((B, S, H, D), json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "pass_ab.json").write_text(json.dumps(res, indent=1))
