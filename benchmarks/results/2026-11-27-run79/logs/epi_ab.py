"""Session 16 experiment (branch fp8-epi): the sm90ws kernels' epilogue with the V scales loaded
as float2 before any store, 1 / l once per row and bf16 pairs stored as 4-byte words (new, the
branch's default) against the epilogue before (XDIT_OPS_FP8_EPI=old: built for the bf16
per-tile kernels at padded head dim 128, 2 consumers, and 64, 3 consumers issuing freely).
Kernel-only time on the same quantized inputs, interleaved; the outputs and LSEs of both
compared bit for bit."""
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

shapes = [tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]]
out_dir = Path(sys.argv[1])
rows = []
for B, S, H, D in shapes:
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    qq = quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128)
    c = 3 if D <= 64 else 2

    def call(var, qq=qq, c=c):
        if var == "old":
            os.environ["XDIT_OPS_FP8_EPI"] = "old"
        else:
            os.environ.pop("XDIT_OPS_FP8_EPI", None)
        return attention_quantized_sm90(qq, torch.bfloat16, True, "sm90ws", k_scale="tile",
                                        consumers=c, ping_pong=(c == 2))
    o_old, l_old = call("old")
    o_new, l_new = call("new")
    same = bool(torch.equal(o_old, o_new) and torch.equal(l_old, l_new))
    diff = (o_old.float() - o_new.float()).abs().max().item()
    fns = {var: (lambda var=var: call(var)) for var in ("old", "new")}
    t = common.bench_interleaved(fns, warmup=10, iters=60, rounds=6, device="cuda")
    for var in ("old", "new"):
        ms = t[var].median_ms
        row = {"B": B, "S": S, "H": H, "D": D, "consumers": c, "epilogue": var, "ms": ms,
               "tflops": common.attention_tflops(B, H, S, S, D, ms), "p20_ms": t[var].p20_ms,
               "p80_ms": t[var].p80_ms, "bit_identical": same, "max_abs_diff": diff}
        print(f"({B},{S},{H},{D}) c{c} {var}: {ms:.4f} ms {row['tflops']:.1f} TFLOPS "
              f"bit-identical {same} max diff {diff:.3g}", flush=True)
        rows.append(row)
    del q, k, v, qq, fns, o_old, o_new
    torch.cuda.empty_cache()
os.environ.pop("XDIT_OPS_FP8_EPI", None)
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"epi_ab-{torch.cuda.get_device_name().replace(' ', '_')}.json").write_text(
    json.dumps({"commit": os.environ.get("XDIT_OPS_GIT_COMMIT"),
                "gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
