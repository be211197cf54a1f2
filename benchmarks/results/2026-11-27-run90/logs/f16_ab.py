"""Branch fp8-unroll-f16: the per-tile sm90ws kernel at padded head dim 128 with the fast
epilogue, unrolled (main) or not (XDIT_OPS_FP8_UNROLL=0), for float16 and bfloat16 outputs:
kernel-only time on the same quantized inputs, interleaved, and the bits against main's.
Usage: python f16_ab.py OUT_DIR B,S,H,D [...]"""
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

VARS = {"unrolled": "1", "not_unrolled": "0"}
out_dir = Path(sys.argv[1])
rows = []
for B, S, H, D in (tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]):
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=dtype, device="cuda")
        qq = quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128)

        def call(var, qq=qq, dtype=dtype):
            os.environ["XDIT_OPS_FP8_UNROLL"] = VARS[var]
            return attention_quantized_sm90(qq, dtype, True, "sm90ws", k_scale="tile")
        o0, l0 = call("unrolled")
        same = {var: bool(torch.equal(call(var)[0], o0) and torch.equal(call(var)[1], l0))
                for var in VARS}
        t = common.bench_interleaved({var: (lambda var=var: call(var)) for var in VARS},
                                     warmup=10, iters=60, rounds=6, device="cuda")
        for var in VARS:
            ms = t[var].median_ms
            rows.append({"B": B, "S": S, "H": H, "D": D, "dtype": str(dtype), "variant": var,
                         "ms": ms, "tflops": common.attention_tflops(B, H, S, S, D, ms),
                         "p20_ms": t[var].p20_ms, "p80_ms": t[var].p80_ms,
                         "bit_identical_to_unrolled": same[var]})
            print(f"({B},{S},{H},{D}) {dtype} {var}: {ms:.4f} ms {rows[-1]['tflops']:.1f} "
                  f"TFLOPS p20-p80 {t[var].p20_ms:.4f}-{t[var].p80_ms:.4f} same bits "
                  f"{same[var]}", flush=True)
        del q, k, v, qq, o0, l0
        torch.cuda.empty_cache()
os.environ.pop("XDIT_OPS_FP8_UNROLL", None)
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"f16_ab-{torch.cuda.get_device_name().replace(' ', '_')}.json").write_text(
    json.dumps({"commit": os.environ.get("XDIT_OPS_GIT_COMMIT"),
                "gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
