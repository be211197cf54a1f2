"""Session 16 experiment (branch fp8-latesum; run 76: run 75's script with the variants from
AB_VARS, 3 = the unsigned arithmetic alone): the per-tile sm90ws kernel at padded head dim 128
(2 consumers, ping-pong, bf16 out) with XDIT_OPS_FP8_WS_VAR = 0 (main), 1 (each thread keeps
its own columns' row sum across the key loop, one quad reduction after it, instead of one per
tile: 4 SHFL + 4 FADD off each tile's chain), 2 (1 + unsigned stage/phase arithmetic in the
consumer's slot). Kernel-only time on the same quantized inputs, interleaved; accuracy against
the fp32 reference, output drift and LSE against the scheme's emulation."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path("benchmarks").resolve()))
import common  # noqa: E402

from xdit_ops.ops.fp8_attention import attention_quantized_sm90, sm90_scheme  # noqa: E402
from xdit_ops.reference.attention import attention_ref  # noqa: E402
from xdit_ops.reference.fp8_attention import (  # noqa: E402
    attention_error_metrics,
    dit_like_qkv,
    fp8_attention_quantized_ref,
)
from xdit_ops.triton.fp8_attention import quantize_qkv_triton  # noqa: E402

shapes = [tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]]
out_dir = Path(sys.argv[1])
VARS = tuple(os.environ.get("AB_VARS", "0,2,3").split(","))
rows = []
for B, S, H, D in shapes:
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    qq = quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128)

    def call(var, qq=qq):
        os.environ["XDIT_OPS_FP8_WS_VAR"] = var
        return attention_quantized_sm90(qq, torch.bfloat16, True, "sm90ws", k_scale="tile",
                                        consumers=2, ping_pong=True)
    acc = {}
    if S <= 16896:
        ref, ref_lse = attention_ref(q.float(), k.float(), v.float())
        eo, el = fp8_attention_quantized_ref(qq, torch.bfloat16, sm90_scheme("sm90ws", "tile"))
        for var in VARS:
            o, lse = call(var)
            m = attention_error_metrics(o, ref)
            m["lse_mean_abs_err"] = (lse.double() - ref_lse.double()).abs().mean().item()
            m["drift_rel_l1_vs_emu"] = attention_error_metrics(o, eo)["rel_l1"]
            m["lse_max_diff_vs_emu"] = (lse - el).abs().max().item()
            acc[var] = m
        o0, l0 = call("0")
        for var in VARS[1:]:
            o, lse = call(var)
            acc[var]["max_abs_diff_vs_var0"] = (o.float() - o0.float()).abs().max().item()
            acc[var]["lse_max_diff_vs_var0"] = (lse - l0).abs().max().item()
        del ref, ref_lse, eo, el
        torch.cuda.empty_cache()
    fns = {var: (lambda var=var: call(var)) for var in VARS}
    t = common.bench_interleaved(fns, warmup=10, iters=60, rounds=6, device="cuda")
    for var in VARS:
        ms = t[var].median_ms
        row = {"B": B, "S": S, "H": H, "D": D, "var": var, "ms": ms,
               "tflops": common.attention_tflops(B, H, S, S, D, ms),
               "p20_ms": t[var].p20_ms, "p80_ms": t[var].p80_ms} | acc.get(var, {})
        print(f"({B},{S},{H},{D}) var {var}: {ms:.4f} ms {row['tflops']:.1f} TFLOPS "
              + " ".join(f"{k_} {v_:.3g}" for k_, v_ in acc.get(var, {}).items()
                         if k_ in ("rel_l1", "drift_rel_l1_vs_emu", "lse_max_diff_vs_emu",
                                   "max_abs_diff_vs_var0", "lse_max_diff_vs_var0")),
              flush=True)
        rows.append(row)
    del q, k, v, qq, fns
    torch.cuda.empty_cache()
os.environ.pop("XDIT_OPS_FP8_WS_VAR", None)
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"var_ab-{torch.cuda.get_device_name().replace(' ', '_')}.json").write_text(
    json.dumps({"commit": os.environ.get("XDIT_OPS_GIT_COMMIT"),
                "gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
