"""Run 97 (from branch quant-sweep): the FP8 quantization pass's Q kernel and K/V statistics
kernel at padded head dim 128 under other launch parameters than QUANT_LAUNCH's (run 92 did
the K/V kernel: 8 warps won 4-7%). Q: warps 4 / 8 / 16, stages 2-4, programs per SM 1-4; the
statistics: warps 4 / 8 / 16, stages 2-4, programs per SM 1-4 (chunks of the keys). Each
config's outputs are compared with the default's bit for bit (the statistics' K sums only where
the chunking is the default's: another chunking sums in another order), and timed (CUDA events,
30 queued calls, median). Usage: python qs_sweep.py OUT_DIR B,S,H,D [...]"""
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

from xdit_ops.reference.fp8_attention import LOG2E, dit_like_qkv
from xdit_ops.triton import fp8_attention as tfa
from xdit_ops.triton.kernels import fp8_attention as kernels


def timed(launch):
    launch()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(30)]
    for a, b in ev:
        a.record()
        launch()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3


def sweep(B, S, H, D, res):
    q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
    DP = 128
    had = tfa.cached_hadamard(DP, q.dtype, q.device)
    ksum, vmax = tfa._kv_stats_partials(k, v, had)
    num_chunks = ksum.shape[1]
    scale = 1.0 / D ** 0.5
    bs = tfa.QUANT_BLOCK_S

    def q_run(warps, stages, per_sm):
        q8 = torch.empty(B, H, S, DP, device="cuda", dtype=torch.int8)
        qs = torch.empty(B, H, S, device="cuda", dtype=torch.float32)
        corr = torch.empty(B, H, S, device="cuda", dtype=torch.float32)
        grid = (tfa._programs_per_head(B * H, triton.cdiv(S, bs), per_sm, q.device), B * H)

        def launch():
            kernels.quantize_q_kernel[grid](
                q, had, ksum, q8, qs, corr, q.stride(0), q.stride(1), q.stride(2),
                H, S, S, num_chunks, scale * LOG2E / DP, scale / DP, D=D, DP=DP, BLOCK_S=bs,
                NUM_CHUNKS_P2=triton.next_power_of_2(num_chunks), UPCAST=False,
                num_warps=warps, num_stages=stages)
        return timed(launch), (q8, qs, corr)

    def stats_run(warps, stages, per_sm):
        tpc = tfa._stats_tokens_per_chunk(B * H, S, per_sm)
        chunks = triton.cdiv(S, tpc)
        ks = torch.empty(B * H, chunks, DP, device="cuda", dtype=torch.float32)
        vm = torch.empty(B * H, chunks, DP, device="cuda", dtype=torch.float32)

        def launch():
            kernels.kv_stats_kernel[(B * H, chunks)](
                k, v, had, ks, vm, k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), H, S, tpc, D=D, DP=DP,
                BLOCK_S=tfa.STATS_BLOCK_S, UPCAST=False, num_warps=warps, num_stages=stages)
        return timed(launch), (ks, vm), chunks

    launch_cfg = tfa.QUANT_LAUNCH[DP]
    q0_us, q0 = q_run(launch_cfg.num_warps, launch_cfg.q_stages, launch_cfg.programs_per_sm)
    s0_us, s0, c0 = stats_run(launch_cfg.num_warps, launch_cfg.stats_stages,
                              launch_cfg.programs_per_sm)
    print(f"({B},{S},{H},{D}) default Q {q0_us:.1f} us, statistics {s0_us:.1f} us", flush=True)
    for warps, stages, per_sm in itertools.product((4, 8, 16), (2, 3, 4), (1, 2, 4)):
        for what, run, base, base_us in (("q", q_run, q0, q0_us), ("stats", stats_run, s0, s0_us)):
            try:
                got = run(warps, stages, per_sm)
            except Exception as e:  # noqa: BLE001 - a config that does not fit: recorded
                res.append({"shape": [B, S, H, D], "kernel": what, "warps": warps,
                            "stages": stages, "per_sm": per_sm, "error": repr(e)[:200]})
                continue
            us, out = got[0], got[1]
            comparable = what == "q" or got[2] == c0
            same = comparable and all(torch.equal(x, y) for x, y in zip(out, base, strict=True))
            res.append({"shape": [B, S, H, D], "kernel": what, "warps": warps,
                        "stages": stages, "per_sm": per_sm, "us": us, "default_us": base_us,
                        "same_bits": same, "comparable": comparable})
            print(f"  {what} warps {warps} stages {stages} per_sm {per_sm}: {us:.1f} us "
                  f"({base_us / us:.3f}x) same bits {same if comparable else 'n/a'}",
                  flush=True)


out_dir = Path(sys.argv[1])
res = []
for arg in sys.argv[2:]:
    sweep(*(int(x) for x in arg.split(",")), res)
    torch.cuda.empty_cache()
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "qs_sweep.json").write_text(json.dumps(res, indent=1))
