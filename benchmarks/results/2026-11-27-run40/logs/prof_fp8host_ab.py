# ruff: noqa
# Host time of one eager fp8_attention call at (1,4608,24,128) bf16, per impl, with the launchers
# through the triton_op layer (before) and calling the bodies (after, branch fp8-eager).
import os, statistics, sys, time, json
sys.path.insert(0, os.environ["SRC"])
import torch
import xdit_ops
import xdit_ops.triton.fp8_attention as tfa
from xdit_ops.reference.fp8_attention import dit_like_qkv
q, k, v = (t.to("cuda", torch.bfloat16).contiguous() for t in dit_like_qkv(1, 4608, 24, 128, seed=0))
orig = tfa._through_op
def busy():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        a = a @ a.T * 1e-4
rows = []
for mode in ("op", "body", "op", "body"):
    tfa._through_op = (lambda: True) if mode == "op" else orig
    for impl in ("auto", "triton"):
        os.environ["XDIT_OPS_FP8_IMPL"] = impl
        for _ in range(5):
            ref = xdit_ops.fp8_attention(q, k, v)
        torch.cuda.synchronize()
        ts = []
        for _ in range(3):
            busy()
            for _ in range(10):
                t0 = time.perf_counter(); o = xdit_ops.fp8_attention(q, k, v); ts.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        row = {"mode": mode, "impl": impl, "host_us_median": 1e6 * statistics.median(ts), "host_us_min": 1e6 * min(ts),
               "gpu": torch.cuda.get_device_name(0)}
        rows.append(row); print(json.dumps(row), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
