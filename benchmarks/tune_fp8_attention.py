"""Sweep the launch configuration of the Triton FP8 attention kernel (``attn_fwd_kernel``).

For every shape (bf16 DiT-like inputs, :func:`xdit_ops.reference.fp8_attention.dit_like_qkv`,
quantized once by the Triton quantization pass) and every config of the head dim's sweep list
(:class:`xdit_ops.triton.fp8_attention.AttnConfig`: BLOCK_M, BLOCK_N, num_warps, num_stages,
two-level P.V accumulation, folded scales), in one process on one GPU:

* time the attention kernel alone (returning the LSE, unlike ``triton_kernel`` in
  bench_fp8_attention.py: one compile per config instead of two; the LSE is one store per row;
  median of CUDA-event-timed calls, ~0.25 s of calls per config) and report TFLOPS =
  4*B*H*S^2*D / t; ``cudnn_bf16`` (SDPA, cuDNN backend, same inputs) is timed as the baseline;
* check the output on a sample of query rows and heads (all keys) against the emulation of the
  config's own scheme (``config_scheme``: its BLOCK_N and accumulation), against the op's scheme
  (BLOCK_N = 64, two-level: what the GPU tests compare with) and against fp32 attention:
  ``ok_emulation``: drift vs the config's emulation <= 10 % of the scheme's own rel L1 and the
  LSE within the GPU tests' bars (99.9 % of rows < 1e-4, all < 1e-2; with fold_scales, which
  rounds differently by design, only the latter);
  ``ok_gate``: the issue's gate against fp32 (cos mean >= 0.999, worst head >= 0.995, rel L1
  <= 0.03); ``ok_op_tests``: the same drift bar against the op's scheme (adopting the config
  as the default keeps tests/ops/test_fp8_attention.py's GPU tests passing);
* a config that fails to compile or launch (shared memory, registers) is recorded with the
  reason and skipped; after ``--budget-s`` seconds (default 420) the remaining configs are
  skipped (recorded as such) so the JSON is always written.

A config is ``valid`` when ok_emulation and ok_gate hold. The best valid config per head dim
(highest geometric-mean TFLOPS over that head dim's shapes, valid on all of them) is printed,
also the best one that passes ok_op_tests too, with the line to paste into
``DEFAULT_CONFIGS`` (xdit_ops/triton/fp8_attention.py) and the env override to try it.

    python benchmarks/tune_fp8_attention.py [--out DIR] [--shapes 1,4608,24,128 ...]
        [--configs 128,64,8,3 128,128,8,2,0 ...] [--time-per-config 0.25] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from xdit_ops.reference.attention import attention_ref  # noqa: E402
from xdit_ops.reference.fp8_attention import (  # noqa: E402
    SCHEME,
    Fp8AttentionScheme,
    QuantizedQKV,
    attention_error_metrics,
    dit_like_qkv,
    fp8_attention_quantized_ref,
)

SHAPES = [(1, 4608, 24, 128), (1, 16896, 24, 128), (1, 32760, 40, 128), (2, 4250, 24, 64)]
# (BLOCK_M, BLOCK_N, num_warps, num_stages, two_level, fold_scales) per padded head dim. Every
# one compiles for sm_90a without register spills (ptxas -v, with the divisibility by 16 the
# launcher's pointers and Sk_pad get at run time; 128x128 tiles at head dim 128 sit at 254-255
# registers). Dropped after that check: 16 warps (128 registers a thread: 0.4-3.6 KB of
# spills), 64x128 tiles over 4 warps at head dim 128 and 128x256 at 64 (spills), 128 rows over
# 4 warps (spills).
SWEEP = {
    128: [
        (128, 64, 8, 2, 1, 0), (128, 64, 8, 3, 1, 0), (128, 64, 8, 4, 1, 0), (64, 64, 4, 3, 1, 0),
        (128, 128, 8, 2, 1, 0), (128, 128, 8, 3, 1, 0), (128, 128, 8, 4, 1, 0),
        (128, 64, 8, 3, 0, 0), (128, 128, 8, 2, 0, 0), (128, 128, 8, 3, 0, 0),
        (128, 64, 8, 3, 1, 1), (128, 128, 8, 3, 1, 1),
    ],
    64: [
        (128, 64, 8, 2, 1, 0), (128, 64, 8, 3, 1, 0), (128, 64, 8, 4, 1, 0), (64, 64, 4, 3, 1, 0),
        (128, 128, 8, 2, 1, 0), (128, 128, 8, 3, 1, 0), (128, 128, 8, 4, 1, 0),
        (64, 128, 4, 3, 1, 0), (128, 64, 8, 3, 0, 0), (128, 128, 8, 3, 0, 0),
        (128, 64, 8, 3, 1, 1), (128, 128, 8, 3, 1, 1),
    ],
}
SAMPLE_ROWS = 384  # query rows checked per shape (against all keys), on SAMPLE_HEADS heads
SAMPLE_HEADS = 3


def _sample(qq: QuantizedQKV, heads: torch.Tensor, rows: torch.Tensor) -> QuantizedQKV:
    """The quantized inputs of some heads and query rows (all keys): the emulation's input."""
    def hq(t):
        return t[:, heads][:, :, rows].contiguous()

    def h(t):
        return t[:, heads].contiguous()

    return QuantizedQKV(hq(qq.q), hq(qq.q_scale), h(qq.k), h(qq.k_scale), h(qq.vt),
                        h(qq.v_scale), hq(qq.lse_corr), qq.seqlen_k, qq.head_dim)


def _time(fn, budget_s: float) -> common.Timing:
    est = common.bench(fn, warmup=1, iters=3).median_ms
    iters = max(5, min(100, int(budget_s * 1e3 / max(est, 1e-3))))
    return common.bench(fn, warmup=2, iters=iters)


def _drift(out, lse, emu_out, emu_lse, own_l1, exact: bool = True) -> dict:
    """Kernel vs emulation: rel L1 <= 10 % of the scheme's own; LSE < 1e-2 everywhere and, where
    the kernel rounds like the emulation (``exact``), < 1e-4 on 99.9 % of rows."""
    d = attention_error_metrics(out, emu_out)["rel_l1"]
    lse_diff = (lse - emu_lse).abs().flatten()
    p999, worst = lse_diff.quantile(0.999).item(), lse_diff.max().item()
    return {"rel_l1": d, "lse_p999": p999, "lse_max": worst,
            "ok": d <= 0.1 * own_l1 and worst < 1e-2 and (p999 < 1e-4 or not exact)}


def _short(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"


def tune_shape(B, S, H, D, configs, budget_s, dev, out_rows: list[dict],
               deadline: float) -> None:
    """Append the baseline's and every config's row for one shape to ``out_rows``."""
    from xdit_ops.triton.fp8_attention import (
        AttnConfig,
        attention_quantized_triton,
        config_scheme,
        quantize_qkv_triton,
    )

    dtype = torch.bfloat16
    base = {"B": B, "S": S, "H": H, "D": D, "dtype": "bfloat16"}
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=dtype, device=dev)
    gen = torch.Generator().manual_seed(S)
    rows = torch.randperm(S, generator=gen)[:SAMPLE_ROWS].sort().values.to(dev)
    heads = torch.linspace(0, H - 1, min(SAMPLE_HEADS, H)).round().long().unique().to(dev)
    qq = quantize_qkv_triton(q, k, v)
    sub = _sample(qq, heads, rows)
    ref, _ = attention_ref(q[:, rows][:, :, heads].float(), k[:, :, heads].float(),
                           v[:, :, heads].float())
    emus: dict[Fp8AttentionScheme, tuple] = {}

    def emulation(scheme: Fp8AttentionScheme):
        # One emulation per distinct scheme (configs differ in BLOCK_N and accumulation only).
        if scheme not in emus:
            emus[scheme] = fp8_attention_quantized_ref(sub, dtype, scheme)
        return emus[scheme]

    scheme_out, _ = emulation(SCHEME)
    own_l1 = attention_error_metrics(scheme_out, ref)["rel_l1"]

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    # cuDNN on the GPU; the CPU (--device cpu, a smoke check of this script under
    # TRITON_INTERPRET=1) has only the math kernel.
    backend = SDPBackend.CUDNN_ATTENTION if dev.type == "cuda" else SDPBackend.MATH
    with sdpa_kernel(backend):
        t = _time(lambda: F.scaled_dot_product_attention(qt, kt, vt), budget_s)
    name = "cudnn_bf16" if dev.type == "cuda" else "sdpa_math"
    out_rows.append(base | {"candidate": name, "ms": t.median_ms, "timing": t,
                            "tflops": common.attention_tflops(B, H, S, S, D, t.median_ms)})
    base_ms = t.median_ms

    for c in configs:
        cfg = AttnConfig(*c[:4], two_level=bool(c[4]), fold_scales=bool(c[5]))
        row = base | {"candidate": "triton_kernel", "config": str(cfg),
                      "block_m": cfg.block_m, "block_n": cfg.block_n,
                      "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                      "two_level": cfg.two_level, "fold_scales": cfg.fold_scales}
        t0 = time.perf_counter()
        if t0 > deadline:
            out_rows.append(row | {"error": "skipped: --budget-s exceeded", "valid": False})
            continue
        try:
            out, lse = attention_quantized_triton(qq, dtype, True, config=cfg)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # compile errors, out of shared memory/registers: record why
            row |= {"error": _short(exc), "valid": False}
            out_rows.append(row)
            if "CUDA error" in str(exc):  # the context is gone: nothing after this would run
                traceback.print_exc()
                raise
            print(f"  {row['config']}: {row['error']}", flush=True)
            continue
        row["first_call_s"] = time.perf_counter() - t0  # includes the compile
        got_out = out[:, rows][:, :, heads]
        got_lse = lse[:, heads][:, :, rows]
        del out, lse
        emu_out, emu_lse = emulation(config_scheme(cfg))
        own = _drift(got_out, got_lse, emu_out, emu_lse, own_l1, exact=not cfg.fold_scales)
        sch_out, sch_lse = emulation(SCHEME)
        sch = _drift(got_out, got_lse, sch_out, sch_lse, own_l1)
        acc = attention_error_metrics(got_out, ref)
        ok_gate = acc["cos_mean"] >= 0.999 and acc["cos_min"] >= 0.995 and acc["rel_l1"] <= 0.03
        # Timed with the LSE (the variant just compiled and checked; its only extra work is
        # one fp32 store per row): a second compile per config would double the sweep's time.
        t = _time(lambda cfg=cfg: attention_quantized_triton(qq, dtype, True, config=cfg),
                  budget_s)
        tflops = common.attention_tflops(B, H, S, S, D, t.median_ms)
        row |= {"ms": t.median_ms, "tflops": tflops, "timing": t,
                "speedup_vs_cudnn_bf16": base_ms / t.median_ms,
                "drift_rel_l1": own["rel_l1"], "drift_lse_p999": own["lse_p999"],
                "drift_lse_max": own["lse_max"], "ok_emulation": own["ok"],
                "drift_vs_op_scheme_rel_l1": sch["rel_l1"], "ok_op_tests": sch["ok"],
                "scheme_own_rel_l1": own_l1, "cos_mean": acc["cos_mean"],
                "cos_min": acc["cos_min"], "rel_l1": acc["rel_l1"], "ok_gate": ok_gate,
                "valid": own["ok"] and ok_gate}
        out_rows.append(row)
        print(f"  {row['config']}: {row['ms']:.3f} ms {row['tflops']:.0f} TFLOPS "
              f"drift {own['rel_l1']:.2e} (op scheme {sch['rel_l1']:.2e}) rel_l1 "
              f"{acc['rel_l1']:.4f} valid {row['valid']}", flush=True)


def best_per_head_dim(rows: list[dict], need_op_tests: bool) -> dict[int, dict]:
    """Per head dim: the config valid on every shape of that head dim with the highest
    geometric-mean TFLOPS (None where no config is)."""
    best = {}
    for d in sorted({r["D"] for r in rows}):
        shapes = {(r["B"], r["S"], r["H"]) for r in rows if r["D"] == d}
        by_cfg: dict[str, list[dict]] = {}
        for r in rows:
            if r["D"] == d and r.get("config") is not None:
                by_cfg.setdefault(r["config"], []).append(r)
        cands = []
        for cfg, rs in by_cfg.items():
            if len(rs) != len(shapes) or not all(r.get("valid") for r in rs):
                continue
            if need_op_tests and not all(r.get("ok_op_tests") for r in rs):
                continue
            gm = math.exp(sum(math.log(r["tflops"]) for r in rs) / len(rs))
            cands.append((gm, cfg, rs))
        if cands:
            gm, cfg, rs = max(cands, key=lambda x: x[0])
            best[d] = {"config": cfg, "geomean_tflops": gm,
                       "tflops": {f"{r['B']}x{r['S']}x{r['H']}x{r['D']}": r["tflops"]
                                  for r in rs}}
        else:
            best[d] = None
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(common.DEFAULT_OUT),
                   help="folder for the JSON result (default benchmarks/results/)")
    p.add_argument("--shapes", type=common.bshd_shape, nargs="+", default=SHAPES,
                   help="B,S,H,D ...")
    p.add_argument("--configs", nargs="+", default=None,
                   help="BLOCK_M,BLOCK_N,num_warps,num_stages[,two_level[,fold_scales]] ... "
                        "(replaces the sweep lists for every head dim)")
    p.add_argument("--time-per-config", type=float, default=0.25,
                   help="seconds of timed calls per config and shape")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting new configs after this many seconds (default 420)")
    p.add_argument("--device", default="cuda",
                   help="cuda (default); cpu only as a smoke check under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("tune_fp8_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    from xdit_ops.reference.fp8_attention import padded_head_dim
    from xdit_ops.triton.fp8_attention import DEFAULT_CONFIGS, parse_config

    given = None
    if args.configs:
        given = [tuple(parse_config(c).as_list()) for c in args.configs]
    t_start = time.perf_counter()
    rows: list[dict] = []
    aborted = None
    for B, S, H, D in args.shapes:
        dp = padded_head_dim(D)
        configs = given or SWEEP[dp]
        print(f"{B}x{S}x{H}x{D} (padded head dim {dp}): {len(configs)} configs", flush=True)
        try:
            tune_shape(B, S, H, D, configs, args.time_per_config, dev, rows,
                       t_start + args.budget_s)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # a dead CUDA context: keep the rows measured so far
            aborted = f"{B}x{S}x{H}x{D}: {_short(exc)}"
            break
    best = best_per_head_dim(rows, need_op_tests=False)
    best_op = best_per_head_dim(rows, need_op_tests=True)
    defaults = {str(d): str(c) for d, c in DEFAULT_CONFIGS.items()}
    path = common.write_json("tune_fp8_attention", rows, args.out, extra={
        "best_valid": best, "best_valid_keeping_op_tests": best_op,
        "default_configs": defaults, "inputs": "dit_like_qkv(seed=0), bf16",
        "sample": f"{SAMPLE_ROWS} query rows x {SAMPLE_HEADS} heads, all keys",
        "time_per_config_s": args.time_per_config, "aborted": aborted,
        "wall_s": time.perf_counter() - t_start})
    common.print_table(
        [r | {"shape": f"{r['B']}x{r['S']}x{r['H']}x{r['D']}"} for r in rows],
        ["shape", "candidate", "config", "ms", "tflops", "speedup_vs_cudnn_bf16", "drift_rel_l1",
         "drift_vs_op_scheme_rel_l1", "rel_l1", "cos_min", "ok_emulation", "ok_gate",
         "ok_op_tests", "valid", "error"], floatfmt=".4g")
    for label, table in (("best valid", best), ("best valid keeping the op's GPU tests", best_op)):
        for d, b in table.items():
            if b is None:
                print(f"{label}, head dim {d}: none")
                continue
            print(f"{label}, head dim {d}: {b['config']} "
                  f"(geomean {b['geomean_tflops']:.0f} TFLOPS; "
                  + ", ".join(f"{s} {t:.0f}" for s, t in b["tflops"].items())
                  + f"); default now {defaults.get(str(d))}; try XDIT_OPS_FP8_TRITON_CONFIG="
                  f"{b['config']}")
    if aborted:
        print(f"ABORTED at {aborted}")
    print(f"wall {time.perf_counter() - t_start:.0f} s; wrote {path}")
    return 1 if aborted else 0


if __name__ == "__main__":
    sys.exit(main())
