"""Session 15 experiment (branch fp8-rowsum): the per-tile sm90ws kernel with the softmax's row
sums from the tensor cores (XDIT_OPS_FP8_ROWSUM=tc: V^T with 8 more rows of e4m3 ones,
P.V with N = Dp + 8; the sum is then of the e4m3 P, the emulation's p8_row_sum=True) and in
four FADD chains per row (=chains) against one FADD chain per row (unset): kernel-only time
on the same quantized inputs, interleaved; accuracy against the fp32 reference and drift
against the emulation of each scheme."""
import json
import os
import sys
from dataclasses import replace
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
VARIANTS = {"fadd": None, "chains": "chains", "tc": "tc"}
rows = []
for B, S, H, D in shapes:
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    qq = quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128)
    cs = [3, 2] if D <= 64 else [2]

    def call(var, c, qq=qq):
        if VARIANTS[var] is None:
            os.environ.pop("XDIT_OPS_FP8_ROWSUM", None)
        else:
            os.environ["XDIT_OPS_FP8_ROWSUM"] = VARIANTS[var]
        return attention_quantized_sm90(qq, torch.bfloat16, True, "sm90ws", k_scale="tile",
                                        consumers=c, ping_pong=(c == 2))
    ref, ref_lse = attention_ref(q.float(), k.float(), v.float())
    base = sm90_scheme("sm90ws", "tile")
    emus = {"fadd": fp8_attention_quantized_ref(qq, torch.bfloat16, base),
            "tc": fp8_attention_quantized_ref(qq, torch.bfloat16, replace(base, p8_row_sum=True))}
    acc = {}
    for c in cs:
        for var in VARIANTS:
            o, lse = call(var, c)
            m = attention_error_metrics(o, ref)
            m["lse_mean_abs_err"] = (lse.double() - ref_lse.double()).abs().mean().item()
            for ev, (eo, el) in emus.items():
                m[f"drift_rel_l1_vs_emu_{ev}"] = attention_error_metrics(o, eo)["rel_l1"]
                m[f"lse_max_diff_vs_emu_{ev}"] = (lse - el).abs().max().item()
            acc[(var, c)] = m
    for ev, (eo, _el) in emus.items():
        acc[("emu_" + ev, 0)] = attention_error_metrics(eo, ref)
    del ref, ref_lse, emus
    torch.cuda.empty_cache()
    fns = {f"{var}_c{c}": (lambda var=var, c=c: call(var, c)) for c in cs for var in VARIANTS}
    t = common.bench_interleaved(fns, warmup=10, iters=60, rounds=6, device="cuda")
    for (var, c), m in acc.items():
        row = {"B": B, "S": S, "H": H, "D": D, "variant": var, "consumers": c} | m
        if c:
            ms = t[f"{var}_c{c}"].median_ms
            row |= {"ms": ms, "tflops": common.attention_tflops(B, H, S, S, D, ms),
                    "p20_ms": t[f"{var}_c{c}"].p20_ms, "p80_ms": t[f"{var}_c{c}"].p80_ms}
            print(f"({B},{S},{H},{D}) c{c} {var}: {ms:.4f} ms {row['tflops']:.1f} TFLOPS "
                  f"relL1 {m['rel_l1']:.5f} cos_min {m['cos_min']:.5f} lse_err "
                  f"{m['lse_mean_abs_err']:.2e} drift vs emu fadd "
                  f"{m['drift_rel_l1_vs_emu_fadd']:.2e} tc {m['drift_rel_l1_vs_emu_tc']:.2e} "
                  f"lse vs emu_tc {m['lse_max_diff_vs_emu_tc']:.2e}",
                  flush=True)
        else:
            print(f"({B},{S},{H},{D}) {var}: relL1 {m['rel_l1']:.5f} cos_min {m['cos_min']:.5f}",
                  flush=True)
        rows.append(row)
    del q, k, v, qq, fns
    torch.cuda.empty_cache()
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"rowsum_ab-{torch.cuda.get_device_name().replace(' ', '_')}.json").write_text(
    json.dumps({"commit": os.environ.get("XDIT_OPS_GIT_COMMIT"),
                "gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
