"""Where the FP8 op's host time goes (one GPU): the median host time of one call (GPU kept
busy by a queued sleep) of the op, of its quantization pass and of pieces of it, and a cProfile
of the pass and of the op. Usage: python quant_host.py B,S,H,D"""
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch

import xdit_ops
from xdit_ops.reference.fp8_attention import dit_like_qkv
from xdit_ops.triton import fp8_attention as tfa

B, S, H, D = (int(x) for x in sys.argv[1].split(","))
q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
had = tfa.cached_hadamard(128 if D > 64 else 64, q.dtype, q.device)


def host_us(fn, n=60):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    hs = []
    for _ in range(n):
        torch.cuda._sleep(int(5e6))
        t0 = time.perf_counter()
        fn()
        hs.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(hs)


pieces = {
    "op fp8_attention": lambda: xdit_ops.fp8_attention(q, k, v),
    "quantize_qkv_triton": lambda: tfa.quantize_qkv_triton(q, k, v, vt_pv_order=True,
                                                            k_block=128),
    "fp8_quantize_triton (op)": lambda: tfa.fp8_quantize_triton(q, k, v, had, 0.088, True,
                                                               "e4m3fn", 128),
    "_quantize (no op)": lambda: tfa._quantize(q, k, v, had, 0.088, True, "e4m3fn", 128),
    "torch.empty x9": lambda: [torch.empty(1024, device="cuda") for _ in range(9)],
    "_kv_stats_partials": lambda: tfa._kv_stats_partials(k, v, had),
}
for name, fn in pieces.items():
    print(f"{name}: {host_us(fn):.1f} us", flush=True)
real = tfa._launch


def direct(kernel, grid, *args, **kwargs):
    kernel[grid](*args, **kwargs)


tfa._launch = direct
print(f"_quantize, launches without wrap_triton: "
      f"{host_us(lambda: tfa._quantize(q, k, v, had, 0.088, True, 'e4m3fn', 128)):.1f} us")
tfa._launch = real
for name in ("quantize_qkv_triton", "op fp8_attention"):
    fn = pieces[name]
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
    print(f"==== cProfile {name} (200 calls), by tottime\n" + s.getvalue()[:9000])
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
    print(f"==== cProfile {name} (200 calls), cumulative\n" + s.getvalue()[:11000])
