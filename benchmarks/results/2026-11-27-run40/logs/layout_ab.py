# ruff: noqa
# cuDNN SDPA on one GPU: BSHD tensors viewed as BHSD (bench_usp's T1 layout, and the layout of
# usp's receive buffers) against contiguous BHSD, full heads and a quarter of them; plus the cost
# of making BHSD copies of q, k, v and copying the output back.
import json, sys, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

def t_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]

def sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)

rows = []
for S, H in ((4608, 24), (16896, 24), (32760, 40)):
    for n in (1, 4):
        h = H // n
        it = 30 if S < 20000 else 8
        q, k, v = (torch.randn(1, S, h, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        bshd = [x.transpose(1, 2) for x in (q, k, v)]
        bhsd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
        r = dict(S=S, H=H, n=n, heads=h, gpu=torch.cuda.get_device_name())
        for rep in range(2):
            r[f"bshd_ms_{rep}"] = t_ms(lambda: sdpa(*bshd), it)
            r[f"bhsd_ms_{rep}"] = t_ms(lambda: sdpa(*bhsd), it)
        o = sdpa(*bhsd)
        r["out_strides_bhsd_in"] = list(o.stride())
        r["out_strides_bshd_in"] = list(sdpa(*bshd).stride())
        r["to_bhsd_copies_ms"] = t_ms(lambda: [x.transpose(1, 2).contiguous() for x in (q, k, v)], 10)
        r["max_abs_diff"] = (sdpa(*bshd) - o).abs().max().item()
        rows.append(r); print(json.dumps(r), flush=True)
        del q, k, v, bshd, bhsd, o
        torch.cuda.empty_cache()
json.dump(rows, open(sys.argv[1], "w"), indent=1)
