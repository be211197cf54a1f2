"""Where the FP8 op's host time goes, piece by piece (one GPU, the GPU kept busy by a queued
sleep so nothing waits for it): the median host time of each piece over 40 calls, then a
cProfile of the op by tottime. Usage: python probe.py B,S,H,D"""
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

import xdit_ops
from xdit_ops.ops import fp8_attention as ofa
from xdit_ops.reference.fp8_attention import dit_like_qkv
from xdit_ops.triton import fp8_attention as tfa
from xdit_ops.triton import launch as L
from xdit_ops.triton.kernels import fp8_attention as kernels

B, S, H, D = (int(x) for x in sys.argv[1].split(","))
q, k, v = dit_like_qkv(B, S, H, D, seed=0, dtype=torch.bfloat16, device="cuda")
DP = 128 if D > 64 else 64
had = tfa.cached_hadamard(DP, q.dtype, q.device)


def host_us(fn, n=40):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1e9))
    hs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        hs.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(hs)


tpc, chunks = tfa._stats_chunks(B, S, H, DP)
ks = torch.empty(B * H, chunks, DP, device="cuda")
vm = torch.empty(B * H, chunks, DP, device="cuda")
lc = tfa.QUANT_LAUNCH[DP]
sargs = (k, v, had, ks, vm, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
         v.stride(2), H, S, tpc)
skw = dict(D=D, DP=DP, BLOCK_S=tfa.STATS_BLOCK_S, UPCAST=False, num_warps=lc.num_warps,
           num_stages=lc.stats_stages)
grid = (B * H, chunks)
compiled = kernels.kv_stats_kernel[grid](*sargs, **skw)
tail = L._tail(kernels.kv_stats_kernel, len(sargs), {k_: v_ for k_, v_ in skw.items()
                                                     if k_ not in L._OPTIONS})
stream = torch.cuda.current_stream().cuda_stream
g3 = grid + (1,)
runner = compiled[g3]
from torch.library import wrap_triton  # noqa: E402

qq = tfa._quantize_qkv(q, k, v, None, True, None, 128, direct=True)
impl = ofa.resolve_impl(q.device, D)
ksc = ofa.resolve_k_scale(impl, D)
cons = ofa.resolve_consumers(impl, D, ksc)
pieces = {
    "aten add": lambda: ks.add_(0),
    "torch.empty 1 MB": lambda: torch.empty(1 << 20, device="cuda", dtype=torch.uint8),
    "_raw_stream": lambda: L._raw_stream(0),
    "torch.cuda.current_device": lambda: torch.cuda.current_device(),
    "launch_key": lambda: L.launch_key(kernels.kv_stats_kernel, 0, sargs, skw),
    "compiled runner (bound)": lambda: runner(*sargs, *tail, stream=stream),
    "compiled[g](...)": lambda: compiled[g3](*sargs, *tail, stream=stream),
    "compiled.run direct": lambda: compiled.run(g3[0], g3[1], g3[2], stream, compiled.function,
                                                compiled.packed_metadata, None, None, None,
                                                *sargs, *tail),
    "L.launch (fast)": lambda: L.launch(kernels.kv_stats_kernel, grid, *sargs, **skw),
    "kernel[grid] (Triton JIT)": lambda: kernels.kv_stats_kernel[grid](*sargs, **skw),
    "wrap_triton outside triton_op": lambda: wrap_triton(kernels.kv_stats_kernel)[grid](
        *sargs, **skw),
    "_quantize one buffer": lambda: tfa._quantize(q, k, v, had, 0.088, True, "e4m3fn", 128,
                                                  one_buffer=True),
    "_quantize_qkv direct": lambda: tfa._quantize_qkv(q, k, v, None, True, None, 128,
                                                      direct=True),
    "quantize_qkv_triton (triton_op)": lambda: tfa.quantize_qkv_triton(q, k, v, vt_pv_order=True,
                                                                       k_block=128),
    "attention_quantized_sm90": lambda: ofa.attention_quantized_sm90(qq, q.dtype, False, impl,
                                                                    k_scale=ksc,
                                                                    consumers=cons),
    "check_inputs": lambda: ofa.check_inputs(q, k, v),
    "resolve_impl": lambda: ofa.resolve_impl(q.device, D),
    "unusable_reason": lambda: ofa.unusable_reason(q.device, q.dtype, D, impl),
    "resolve_format": lambda: ofa.resolve_format(q.device),
    "resolve_k_scale": lambda: ofa.resolve_k_scale(impl, D),
    "consumers_setting": lambda: ofa.consumers_setting(),
    "cached_hadamard": lambda: tfa.cached_hadamard(DP, q.dtype, q.device),
    "_fp8_attention_cuda": lambda: ofa._fp8_attention_cuda(q, k, v),
    "op fp8_attention": lambda: xdit_ops.fp8_attention(q, k, v),
}
os.environ[L.FAST_ENV] = "1"
for name, fn in pieces.items():
    print(f"{name}: {host_us(fn):.1f} us", flush=True)
os.environ[L.FAST_ENV] = "0"
print(f"op fp8_attention, fast launch off: {host_us(pieces['op fp8_attention']):.1f} us")
os.environ[L.FAST_ENV] = "1"
for name in ("op fp8_attention",):
    fn = pieces[name]
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(100):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    print(f"==== cProfile {name} (100 calls, GPU busy), by tottime\n" + s.getvalue()[:8000])
