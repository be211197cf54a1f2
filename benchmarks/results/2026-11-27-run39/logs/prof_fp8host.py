# ruff: noqa
# Host time of one eager fp8_attention call at (1,4608,24,128) bf16, per impl, with cProfile.
import cProfile, io, os, pstats, statistics, sys, time
sys.path.insert(0, os.environ["SRC"])
import torch
import xdit_ops
from xdit_ops.reference.fp8_attention import dit_like_qkv
q, k, v = (t.to("cuda", torch.bfloat16).contiguous() for t in dit_like_qkv(1, 4608, 24, 128, seed=0))
def busy():  # keep the GPU busy so enqueue time is host time
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        a = a @ a.T * 1e-4
for impl in ("auto", "triton"):
    os.environ["XDIT_OPS_FP8_IMPL"] = impl
    for _ in range(5):
        xdit_ops.fp8_attention(q, k, v)
    torch.cuda.synchronize()
    ts = []
    for _ in range(3):
        busy()
        for _ in range(10):
            t0 = time.perf_counter(); xdit_ops.fp8_attention(q, k, v); ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    print(f"=== impl {impl}: host per eager call median {1e6*statistics.median(ts):.1f} us, min {1e6*min(ts):.1f}", flush=True)
    busy()
    pr = cProfile.Profile(); pr.enable()
    for _ in range(10):
        xdit_ops.fp8_attention(q, k, v)
    pr.disable(); torch.cuda.synchronize()
    for key in ("tottime", "cumtime"):
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats(key).print_stats(22); print(s.getvalue()[-4500:], flush=True)
