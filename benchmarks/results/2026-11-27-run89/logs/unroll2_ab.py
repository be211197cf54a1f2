"""Branch fp8-unroll2: the per-tile sm90ws kernels with other unrolls (XDIT_OPS_FP8_UNROLL):
at padded head dim 128 (bf16) ``fastall`` (unrolled by two, the fast epilogue at every
length) and ``u4`` (unrolled by four, the fast epilogue) against main's kernels; at 64 with 3
consumers ``c3u2`` (unrolled by two) against main's. Kernel-only time on the same quantized
inputs, interleaved, and the outputs' bits against main's kernel.
Usage: python unroll2_ab.py OUT_DIR B,S,H,D [...]"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path("benchmarks").resolve()))
import common  # noqa: E402

from xdit_ops.ops.fp8_attention import attention_quantized_sm90  # noqa: E402
from xdit_ops.reference.fp8_attention import dit_like_qkv  # noqa: E402
from xdit_ops.triton.fp8_attention import quantize_qkv_triton  # noqa: E402

out_dir = Path(sys.argv[1])
rows = []
for B, S, H, D in (tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]):
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    qq = quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128)
    consumers = 3 if D <= 64 else 2
    variants = {"main": "0", "c3u2": "c3u2"} if D <= 64 else {
        "main": "0", "fastall": "fastall", "u4": "u4"}

    def call(var, qq=qq, consumers=consumers, variants=variants):
        os.environ["XDIT_OPS_FP8_UNROLL"] = variants[var]
        return attention_quantized_sm90(qq, torch.bfloat16, True, "sm90ws", k_scale="tile",
                                        consumers=consumers)
    o0, l0 = call("main")
    same = {var: bool(torch.equal(call(var)[0], o0) and torch.equal(call(var)[1], l0))
            for var in variants}
    t = common.bench_interleaved({var: (lambda var=var: call(var)) for var in variants},
                                 warmup=10, iters=60, rounds=6, device="cuda")
    for var in variants:
        ms = t[var].median_ms
        rows.append({"B": B, "S": S, "H": H, "D": D, "variant": var, "ms": ms,
                     "tflops": common.attention_tflops(B, H, S, S, D, ms),
                     "p20_ms": t[var].p20_ms, "p80_ms": t[var].p80_ms,
                     "bit_identical_to_main": same[var]})
        print(f"({B},{S},{H},{D}) {var}: {ms:.4f} ms {rows[-1]['tflops']:.1f} TFLOPS "
              f"p20-p80 {t[var].p20_ms:.4f}-{t[var].p80_ms:.4f} same bits {same[var]}",
              flush=True)
    del q, k, v, qq, o0, l0
    torch.cuda.empty_cache()
os.environ.pop("XDIT_OPS_FP8_UNROLL", None)
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"unroll2_ab-{torch.cuda.get_device_name().replace(' ', '_')}.json").write_text(
    json.dumps({"commit": os.environ.get("XDIT_OPS_GIT_COMMIT"),
                "gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
