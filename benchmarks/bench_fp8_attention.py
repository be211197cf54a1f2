"""FP8 attention (``xdit_ops.fp8_attention``) vs cuDNN bf16 SDPA: speed and accuracy.

For every (B, S, H, D) shape, on the same DiT-like bf16 BSHD tensors
(:func:`xdit_ops.reference.fp8_attention.dit_like_qkv`: heavy-tailed Q, K with a large common
offset and outlier channels), in one process, timed interleaved
(:func:`common.bench_interleaved`):

* ``cudnn_bf16``: ``F.scaled_dot_product_attention`` on BHSD views under the cuDNN backend,
  the baseline;
* per available implementation ``<impl>`` of the FP8 op (``triton``; ``sm90`` and ``sm90ws``
  when ``XDIT_OPS_FP8_IMPL=sm90`` / ``sm90ws`` can run): ``<impl>_total``, the op end to end
  (quantization included), what a model pays, and ``<impl>_kernel``, the attention kernel
  alone on pre-quantized inputs; ``triton_quant`` is the quantization pass alone (every
  implementation uses it).
* with ``sm90ws`` (unless ``--no-ktile``), its variant with one K scale per 128-key tile
  (``XDIT_OPS_FP8_K_SCALE=tile``; the kernel ``fp8_attention_sm90ws_ktile_fwd``, padded head
  dims 64 and 128): ``sm90ws_ktile_total`` (the op under the switch), ``sm90ws_ktile_kernel`` (the
  kernel on the pass's k_block=128 output) and ``triton_quant_ktile`` (that pass alone, against
  ``triton_quant_pv``, the per-key pass as sm90ws gets it: V^T in the P.V key order), timed in
  the same interleaved rounds as the per-key ``sm90ws_*`` rows (an A/B on one GPU).
* the ``sm90ws_ktile_*`` rows are the per-tile kernel with 2 consumer warpgroups (128 query
  rows per CTA, ``XDIT_OPS_FP8_SM90_CONSUMERS=2``); with ``--consumers 3`` (default: ``2 3``),
  at padded head dim 64, the kernel with 3 (192 rows per CTA, issuing freely; auto's choice
  there): ``sm90ws_ktile_c3_kernel`` (on the same quantized inputs) and
  ``sm90ws_ktile_c3_total`` (the op under ``=3``, with accuracy); with ``--consumers 3rr`` the
  3-consumer kernel in the round-robin issue order (``ping_pong=True``, bfloat16):
  ``sm90ws_ktile_c3rr_kernel`` and ``sm90ws_ktile_c3rr_total`` (the quantization pass and the
  kernel called directly: no switch value selects it). Timed in the same interleaved rounds.

Reported per row: median ms, TFLOPS = 4*B*H*S^2*D / t (also for the quantization pass, so that
``total`` and ``kernel`` compare), speed-up over cuDNN bf16, and for ``cudnn_bf16`` and
``<impl>_total`` the accuracy against the fp32 reference on the GPU (cosine similarity mean and
worst head, relative L1, RMSE, mean |LSE error|) and the ratio of rel L1 to cuDNN bf16's own.
``naive_fp8`` rows give the accuracy of per-tensor FP8 (FlashAttention-3's released numerics,
emulated) on the same inputs, for comparison; they are not timed.

    python benchmarks/bench_fp8_attention.py [--out DIR] [--shapes 1,4608,24,128 ...] [--quick]
        [--impls triton sm90 sm90ws] [--no-ktile] [--consumers 2 3 3rr]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import xdit_ops  # noqa: E402
from xdit_ops.ops.fp8_attention import unusable_reason  # noqa: E402
from xdit_ops.reference.attention import attention_ref  # noqa: E402
from xdit_ops.reference.fp8_attention import (  # noqa: E402
    attention_error_metrics,
    dit_like_qkv,
    fp8_attention_naive_ref,
    padded_head_dim,
)

SHAPES = [(1, 4608, 24, 128), (1, 16896, 24, 128), (1, 32760, 40, 128), (2, 4250, 24, 64)]
BASELINE = "cudnn_bf16"
IMPLS = ("triton", "sm90", "sm90ws")
K_SCALE_ENV = "XDIT_OPS_FP8_K_SCALE"
CONSUMERS_ENV = "XDIT_OPS_FP8_SM90_CONSUMERS"
# --consumers: the per-tile kernel's variants beside its 2-consumer rows (padded head dim 64):
# row-name suffix -> (consumers, ping_pong)
CONSUMER_VARIANTS = {"c3": (3, False), "c3rr": (3, True)}
CONSUMER_CHOICES = {"2": None, "3": "c3", "3rr": "c3rr"}


def _with_impl(impl: str, fn: Callable[[], object], k_scale: str = "token",
               consumers: str = "auto") -> Callable[[], object]:
    def call():
        os.environ["XDIT_OPS_FP8_IMPL"] = impl
        os.environ[K_SCALE_ENV] = k_scale
        os.environ[CONSUMERS_ENV] = consumers
        return fn()
    return call


def candidates(q, k, v, impls: list[str], ktile: bool = False, variants: tuple[str, ...] = ()
               ) -> dict[str, Callable[[], object]]:
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    fns: dict[str, Callable[[], object]] = {BASELINE: lambda: F.scaled_dot_product_attention(
        qt, kt, vt)}
    if not impls:
        return fns
    from xdit_ops.ops.fp8_attention import SM90_VT_PV_ORDER, attention_quantized_sm90
    from xdit_ops.reference.fp8_attention import in_pv_order
    from xdit_ops.triton.fp8_attention import attention_quantized_triton, quantize_qkv_triton

    # Every implementation's kernel runs after the same Triton quantization pass: quantize once
    # and time the kernels on the same quantized inputs (sm90ws: V^T's keys in its P.V key
    # order, the same bytes permuted).
    qq = quantize_qkv_triton(q, k, v)
    qq_pv = in_pv_order(qq)
    fns["triton_quant"] = lambda: quantize_qkv_triton(q, k, v)
    for impl in impls:
        if impl == "triton":
            fns["triton_kernel"] = lambda: attention_quantized_triton(qq, q.dtype, False)
        else:  # sm90, sm90ws
            fns[f"{impl}_kernel"] = lambda impl=impl: attention_quantized_sm90(
                qq_pv if SM90_VT_PV_ORDER[impl] else qq, q.dtype, False, impl)
        fns[f"{impl}_total"] = _with_impl(impl, lambda: xdit_ops.fp8_attention(q, k, v))
    if ktile:
        # sm90ws with one K scale per 128-key tile: the pass with k_block=128 (V^T in the P.V
        # key order, as the op writes it for sm90ws) and the kernel's tile variant.
        qq_tile = quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128)
        # the A side of triton_quant_ktile: the per-key pass as sm90ws gets it
        fns["triton_quant_pv"] = lambda: quantize_qkv_triton(q, k, v, vt_pv_order=True)
        fns["triton_quant_ktile"] = lambda: quantize_qkv_triton(q, k, v, vt_pv_order=True,
                                                                k_block=128)
        fns["sm90ws_ktile_kernel"] = lambda: attention_quantized_sm90(
            qq_tile, q.dtype, False, "sm90ws", k_scale="tile")
        fns["sm90ws_ktile_total"] = _with_impl(  # (2 consumers: the 3-consumer rows below)
            "sm90ws", lambda: xdit_ops.fp8_attention(q, k, v), "tile", "2")
        # the 3-consumer kernels (variants: CONSUMER_VARIANTS keys; padded head dim 64 only)
        for var in variants:
            consumers, ping_pong = CONSUMER_VARIANTS[var]
            fns[f"sm90ws_ktile_{var}_kernel"] = (
                lambda consumers=consumers, ping_pong=ping_pong: attention_quantized_sm90(
                    qq_tile, q.dtype, False, "sm90ws", k_scale="tile", consumers=consumers,
                    ping_pong=ping_pong))
            if not ping_pong:  # the op's 3 consumers issue freely
                fns[f"sm90ws_ktile_{var}_total"] = _with_impl(
                    "sm90ws", lambda: xdit_ops.fp8_attention(q, k, v), "tile", str(consumers))
            else:
                fns[f"sm90ws_ktile_{var}_total"] = (
                    lambda consumers=consumers: attention_quantized_sm90(
                        quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128), q.dtype,
                        False, "sm90ws", k_scale="tile", consumers=consumers, ping_pong=True))
    return fns


def _accuracy(out, lse, ref, ref_lse) -> dict:
    m = attention_error_metrics(out, ref)
    if lse is not None:
        m["lse_mean_abs_err"] = (lse.double() - ref_lse.double()).abs().mean().item()
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--shapes", type=common.bshd_shape, nargs="+", default=SHAPES,
                   help="B,S,H,D ...")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="FP8 implementations to try (those that cannot run are skipped)")
    p.add_argument("--no-ktile", action="store_true",
                   help="skip sm90ws' per-tile K-scale variant (XDIT_OPS_FP8_K_SCALE=tile)")
    p.add_argument("--consumers", nargs="+", choices=list(CONSUMER_CHOICES), default=["2", "3"],
                   help="the per-tile sm90ws kernel's consumer warpgroups to time at padded head "
                        "dim 64: 2 (the sm90ws_ktile_* rows, always there), 3 (issuing freely: "
                        "sm90ws_ktile_c3_* rows), 3rr (3 in round robin: sm90ws_ktile_c3rr_* "
                        "rows)")
    p.add_argument("--no-naive", action="store_true",
                   help="skip the per-tensor FP8 accuracy rows (an emulation, slow at 32k)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    warmup, iters, rounds = common.iters_of(args)
    shapes = args.shapes[:2] if args.quick and args.shapes is SHAPES else args.shapes
    dtype = torch.bfloat16
    dev = torch.device("cuda")
    skipped = {i: unusable_reason(dev, dtype, 128, i) for i in args.impls}
    impls = [i for i in args.impls if skipped[i] is None]
    ktile = False
    if "sm90ws" in impls and not args.no_ktile:
        os.environ[K_SCALE_ENV] = "tile"
        skipped["sm90ws_ktile"] = unusable_reason(dev, dtype, 128, "sm90ws")
        ktile = skipped["sm90ws_ktile"] is None
    os.environ[K_SCALE_ENV] = "token"
    variants = tuple(CONSUMER_CHOICES[c] for c in args.consumers if CONSUMER_CHOICES[c])
    if variants and not ktile:
        skipped["sm90ws_ktile_c3"] = "needs sm90ws' per-tile variant (see sm90ws_ktile)"
        variants = ()
    rows = []
    for B, S, H, D in shapes:
        # the 3-consumer kernels are built at padded head dim 64 only
        shape_variants = variants if padded_head_dim(D) == 64 else ()
        q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=dtype, device=dev)
        ref, ref_lse = attention_ref(q.float(), k.float(), v.float())
        acc = {}
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            base = xdit_ops.attention(q, k, v, backend="cudnn", return_lse=True)
            acc[BASELINE] = _accuracy(*base, ref, ref_lse)
            del base
            runs = [(impl, "token", "auto", f"{impl}_total") for impl in impls]
            if ktile:
                runs.append(("sm90ws", "tile", "auto", "sm90ws_ktile_total"))
            if "c3" in shape_variants:
                runs.append(("sm90ws", "tile", "3", "sm90ws_ktile_c3_total"))
            for impl, k_scale, consumers, name in runs:
                os.environ["XDIT_OPS_FP8_IMPL"] = impl
                os.environ[K_SCALE_ENV] = k_scale
                os.environ[CONSUMERS_ENV] = consumers
                out, lse = xdit_ops.fp8_attention(q, k, v, return_lse=True)
                acc[name] = _accuracy(out, lse, ref, ref_lse)
                del out, lse
            os.environ[K_SCALE_ENV] = "token"
            os.environ[CONSUMERS_ENV] = "auto"
            if not args.no_naive:
                out, lse = fp8_attention_naive_ref(q, k, v)
                acc["naive_fp8"] = _accuracy(out, lse, ref, ref_lse)
                del out, lse
            del ref, ref_lse
            torch.cuda.empty_cache()
            fns = candidates(q, k, v, impls, ktile, shape_variants)
            timings = common.bench_interleaved(fns, warmup=warmup, iters=iters, rounds=rounds,
                                               cold_l2=args.cold_l2, cuda_graph=args.cuda_graph,
                                               device=dev)
        base_ms = timings[BASELINE].median_ms
        base_l1 = acc[BASELINE]["rel_l1"]
        for name, t in timings.items():
            row = {"B": B, "S": S, "H": H, "D": D, "dtype": "bfloat16", "candidate": name,
                   "ms": t.median_ms, "tflops": common.attention_tflops(B, H, S, S, D,
                                                                        t.median_ms),
                   "speedup_vs_cudnn_bf16": base_ms / t.median_ms, "timing": t}
            if name in acc:
                row |= acc[name] | {"rel_l1_vs_cudnn_bf16": acc[name]["rel_l1"] / base_l1}
            rows.append(row)
        if "naive_fp8" in acc:
            rows.append({"B": B, "S": S, "H": H, "D": D, "dtype": "bfloat16",
                         "candidate": "naive_fp8"} | acc["naive_fp8"]
                        | {"rel_l1_vs_cudnn_bf16": acc["naive_fp8"]["rel_l1"] / base_l1})
        del q, k, v, fns
        torch.cuda.empty_cache()
    os.environ.pop("XDIT_OPS_FP8_IMPL", None)
    os.environ.pop(K_SCALE_ENV, None)
    os.environ.pop(CONSUMERS_ENV, None)

    targets = {}
    for r in rows:
        if r["candidate"].endswith("_total") and r["D"] == 128 and r["S"] >= 16000:
            targets[f"{r['candidate']} {r['B']}x{r['S']}x{r['H']}x{r['D']} >= 900 TFLOPS"] = (
                r["tflops"] >= 900)
        if r["candidate"].endswith("_total") and r["D"] == 64:
            targets[f"{r['candidate']} {r['B']}x{r['S']}x{r['H']}x{r['D']} >= 1.4x cuDNN"] = (
                r["speedup_vs_cudnn_bf16"] >= 1.4)
    path = common.write_json("bench_fp8_attention", rows, args.out, extra={
        "targets": targets, "unusable_impls": {i: w for i, w in skipped.items() if w},
        "warmup": warmup, "iters": iters, "rounds": rounds, "cold_l2": args.cold_l2,
        "cuda_graph": args.cuda_graph, "inputs": "dit_like_qkv(seed=0)",
        "consumers": args.consumers,
        # the pass's statistics (XDIT_OPS_FP8_STATS): a strided sample's past 1024 keys, or exact
        "stats": os.environ.get("XDIT_OPS_FP8_STATS", "sample")})
    common.print_table(
        [r | {"shape": f"{r['B']}x{r['S']}x{r['H']}x{r['D']}"} for r in rows],
        ["shape", "candidate", "ms", "tflops", "speedup_vs_cudnn_bf16", "cos_mean", "cos_min",
         "rel_l1", "rel_l1_vs_cudnn_bf16", "lse_mean_abs_err"], floatfmt=".4g")
    for what, ok in targets.items():
        print(f"target {what}: {'PASS' if ok else 'MISS'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
