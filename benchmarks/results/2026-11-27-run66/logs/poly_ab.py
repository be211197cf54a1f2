"""Session 15 experiment (branch fp8-poly): the per-tile sm90ws kernel with every R-th
exponential pair of unmasked tiles on the FMA pipe (exp2_fma; XDIT_OPS_FP8_EXP_POLY=R, read by
the launcher), R in {0 (MUFU only), 8, 4, 3, 2}: kernel-only time on the same quantized inputs,
interleaved, and the output's difference from R=0 and from the fp32 reference."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path("benchmarks").resolve()))
import common  # noqa: E402

from xdit_ops.ops.fp8_attention import attention_quantized_sm90  # noqa: E402
from xdit_ops.reference.attention import attention_ref  # noqa: E402
from xdit_ops.reference.fp8_attention import attention_error_metrics, dit_like_qkv  # noqa: E402
from xdit_ops.triton.fp8_attention import quantize_qkv_triton  # noqa: E402

RS = [int(r) for r in os.environ.get("RS", "0 8 4 3 2").split()]
shapes = [tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]]
out_dir = Path(sys.argv[1])
rows = []
for B, S, H, D in shapes:
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    qq = quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128)
    c = 3 if D <= 64 else 2

    def call(r, c=c, qq=qq):
        os.environ["XDIT_OPS_FP8_EXP_POLY"] = str(r)
        return attention_quantized_sm90(qq, torch.bfloat16, True, "sm90ws", k_scale="tile",
                                        consumers=c, ping_pong=(c == 2))
    ref, ref_lse = attention_ref(q.float(), k.float(), v.float())
    outs = {r: call(r) for r in RS}
    base_o, base_l = outs[0]
    acc = {}
    for r, (o, lse) in outs.items():
        m = attention_error_metrics(o, ref)
        m["lse_mean_abs_err"] = (lse.double() - ref_lse.double()).abs().mean().item()
        m["max_abs_diff_vs_r0"] = (o.float() - base_o.float()).abs().max().item()
        m["rel_l1_vs_r0"] = ((o.float() - base_o.float()).abs().sum()
                             / base_o.float().abs().sum()).item()
        m["lse_max_diff_vs_r0"] = (lse - base_l).abs().max().item()
        acc[r] = m
    del ref, ref_lse, outs, base_o, base_l
    torch.cuda.empty_cache()
    fns = {f"R{r}": (lambda r=r: call(r)) for r in RS}
    t = common.bench_interleaved(fns, warmup=10, iters=60, rounds=6, device="cuda")
    for r in RS:
        ms = t[f"R{r}"].median_ms
        row = {"B": B, "S": S, "H": H, "D": D, "R": r, "consumers": c, "ms": ms,
               "tflops": common.attention_tflops(B, H, S, S, D, ms), "p20_ms": t[f"R{r}"].p20_ms,
               "p80_ms": t[f"R{r}"].p80_ms} | acc[r]
        rows.append(row)
        print(f"({B},{S},{H},{D}) c{c} R={r}: {ms:.4f} ms {row['tflops']:.1f} TFLOPS "
              f"relL1 {acc[r]['rel_l1']:.5f} cos_min {acc[r].get('cos_min', float('nan')):.5f} "
              f"vs R0 relL1 {acc[r]['rel_l1_vs_r0']:.2e} lse {acc[r]['lse_max_diff_vs_r0']:.2e}",
              flush=True)
    del q, k, v, qq, fns
    torch.cuda.empty_cache()
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"poly_ab-{torch.cuda.get_device_name().replace(' ', '_')}.json").write_text(
    json.dumps({"commit": os.environ.get("XDIT_OPS_GIT_COMMIT"),
                "gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
