# ruff: noqa
"""Single-GPU cuDNN SDPA time of the per-rank attention of Ulysses-N (H/N heads over the whole
sequence) against the full problem: how much of the parallel efficiency gap is the attention
itself running below 1/N of the full time. Also a local copy of one rank's output (the push's
copy-out). BSHD tensors viewed as BHSD, as bench_usp's single-GPU baseline."""
import json, os, sys
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

def t_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    es = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ts = []
    for _ in range(iters):
        es[0].record(); fn(); es[1].record(); torch.cuda.synchronize()
        ts.append(es[0].elapsed_time(es[1]))
    ts.sort()
    return ts[len(ts) // 2]

rows = []
for S, H in ((4608, 24), (16896, 24), (32760, 40)):
    full = None
    for n in (1, 2, 4):
        h = H // n
        q, k, v = (torch.randn(1, S, h, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        def f():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt)
        ms = t_ms(f, 40 if S < 20000 else 12)
        full = full or ms
        o = torch.empty(1, S // n, H, 128, device="cuda", dtype=torch.bfloat16)
        o2 = torch.empty_like(o)
        cp = t_ms(lambda: o2.copy_(o), 20)
        r = dict(S=S, H=H, n=n, heads=h, attn_ms=ms, ideal_ms=full / n, ratio=full / (n * ms),
                 copy_out_ms=cp, copy_out_MB=o.numel() * 2 / 1e6)
        rows.append(r); print(json.dumps(r), flush=True)
        del q, k, v, o, o2
out = os.environ.get("OUT", ".")
json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
          open(os.path.join(out, "attn_heads.json"), "w"), indent=1)
