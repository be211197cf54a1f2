"""The FP8 quantization pass's K/V kernel (quantize_kv_kernel, per-tile K scales, V^T in the
P.V key order: what the op runs at padded head dim 128) under other launch parameters than
QUANT_LAUNCH's: warps, K-loop stages, V-loop stages, programs per SM. Each config's outputs
are compared with the default's bit for bit, and timed (CUDA events, 30 queued calls, median).
Usage: python kv_sweep.py OUT_DIR B,S,H,D [...]"""
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

from xdit_ops.reference.fp8_attention import SCHEME, dit_like_qkv, pad_to
from xdit_ops.triton import fp8_attention as tfa
from xdit_ops.triton.kernels import fp8_attention as kernels


def sweep(B, S, H, D, res):
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    DP = 128
    had = tfa.cached_hadamard(DP, q.dtype, q.device)
    ksum, vmax = tfa._kv_stats_partials(k, v, had)
    num_chunks = ksum.shape[1]
    Sk_pad = pad_to(max(S, 1), SCHEME.block_n)
    kvb = 128
    tiles = triton.cdiv(Sk_pad, kvb)

    def run(warps, stages, vstages, per_sm):
        k8 = torch.empty(B, H, Sk_pad, DP, device="cuda", dtype=torch.int8)
        ks = torch.empty(B, H, Sk_pad, device="cuda", dtype=torch.float32)
        vt8 = torch.empty(B, H, DP, Sk_pad, device="cuda", dtype=torch.float8_e4m3fn)
        vs = torch.empty(B, H, DP, device="cuda", dtype=torch.float32)
        grid = (tfa._programs_per_head(B * H, tiles, per_sm, q.device), B * H)

        def launch():
            kernels.quantize_kv_kernel[grid](
                k, v, had, ksum, vmax, k8, ks, vt8, vs,
                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                H, S, Sk_pad, num_chunks, D=D, DP=DP, BLOCK_S=kvb,
                NUM_CHUNKS_P2=triton.next_power_of_2(num_chunks), UPCAST=False,
                VT_PV_ORDER=True, K_BLOCK=kvb, V_STAGES=vstages, num_warps=warps,
                num_stages=stages)
        launch()
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(30)]
        for a, b in ev:
            a.record()
            launch()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3, (k8, ks, vt8, vs)

    base_us, base_out = run(16, 3, 3, 1)  # QUANT_LAUNCH[128] at k_block 128
    moved = 2 * B * S * H * D * 2 + 2 * B * S * H * DP + 4 * B * S * H
    print(f"({B},{S},{H},{D}) default: {base_us:.1f} us {moved / base_us / 1e3:.0f} GB/s",
          flush=True)
    for warps, stages, vstages, per_sm in itertools.product((8, 16), (2, 3, 4), (2, 3, 4),
                                                            (1, 2)):
        try:
            us, out = run(warps, stages, vstages, per_sm)
        except Exception as e:  # noqa: BLE001 - a config that does not fit: recorded
            res.append({"shape": [B, S, H, D], "warps": warps, "stages": stages,
                        "v_stages": vstages, "per_sm": per_sm, "error": repr(e)[:200]})
            continue
        same = all(torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                               y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y)
                   for x, y in zip(out, base_out, strict=True))
        res.append({"shape": [B, S, H, D], "warps": warps, "stages": stages,
                    "v_stages": vstages, "per_sm": per_sm, "us": us, "default_us": base_us,
                    "GBps": moved / us / 1e3, "same_bits": same})
        print(f"  warps {warps} stages {stages} v_stages {vstages} per_sm {per_sm}: "
              f"{us:.1f} us ({base_us / us:.3f}x) same bits {same}", flush=True)


out_dir = Path(sys.argv[1])
res = []
for arg in sys.argv[2:]:
    sweep(*(int(x) for x in arg.split(",")), res)
    torch.cuda.empty_cache()
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "kv_sweep.json").write_text(json.dumps(res, indent=1))
