"""The sm90ws per-tile kernel at padded head dim 128, persistent (one CTA an SM walking the CTA
tiles) against one CTA a tile (XDIT_OPS_FP8_PERSISTENT=1 / 0, read per call by the launcher),
kernel-only on the same quantized inputs, interleaved, 4 rounds; and the whole op (pass and
kernel) per queued call. GPU time: calls queued behind a GPU sleep, CUDA events.
Usage: python persist_ab.py OUT_DIR"""
import json
import os
import statistics
import sys
from pathlib import Path

import torch

import xdit_ops
from xdit_ops.ops.fp8_attention import attention_quantized_sm90
from xdit_ops.reference.fp8_attention import dit_like_qkv
from xdit_ops.triton.fp8_attention import quantize_qkv_triton

out_dir = Path(sys.argv[1])
SHAPES = [(1, 4608, 24, 128), (1, 16896, 24, 128), (1, 32760, 40, 128), (2, 4096, 24, 128)]


def gpu_us(fn, n):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000_000)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / n


res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("XDIT_OPS_GIT_COMMIT")}
for B, S, H, D in SHAPES:
    flops = 4 * B * H * S * S * D
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    qq = quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128)
    n = max(3, int(2e13 // flops))
    kern = {"1": [], "0": []}
    op = {"1": [], "0": []}
    outs = {}
    for _ in range(4):
        for mode in ("1", "0"):
            os.environ["XDIT_OPS_FP8_PERSISTENT"] = mode
            kern[mode].append(gpu_us(lambda qq=qq: attention_quantized_sm90(
                qq, torch.bfloat16, impl="sm90ws", k_scale="tile"), n))
            op[mode].append(gpu_us(lambda q=q, k=k, v=v: xdit_ops.fp8_attention(q, k, v), n))
            outs[mode] = attention_quantized_sm90(qq, torch.bfloat16, impl="sm90ws",
                                                  k_scale="tile")
    same = all(torch.equal(a, b) for a, b in zip(outs["1"], outs["0"], strict=True))
    row = {"n": n, "same_bits": same}
    for name, d in (("kernel", kern), ("op", op)):
        for mode, label in (("1", "persistent"), ("0", "per_tile")):
            us = statistics.median(d[mode])
            row[f"{name}_{label}_us"] = us
            row[f"{name}_{label}_tflops"] = flops / us / 1e6
            row[f"{name}_{label}_samples"] = d[mode]
    res[f"{B},{S},{H},{D}"] = row
    print((B, S, H, D), json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                                    for k, v in row.items() if "samples" not in k}), flush=True)
    del q, k, v, qq
    torch.cuda.empty_cache()
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "persist_ab.json").write_text(json.dumps(res, indent=1))
