# ruff: noqa
import sys, time, json
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/tests/ops")
from dataclasses import replace
import torch
from xdit_ops.reference.fp8_attention import SCHEME, fp8_attention_ref, dit_like_qkv, attention_error_metrics
from xdit_ops.reference.attention import attention_ref
torch.set_num_threads(2)
def oracle(q, k, v):
    o, lse = attention_ref(q.double(), k.double(), v.double())
    return o, lse
rows = []
for (B, S, H, D) in [(1, 2048, 2, 128), (1, 4096, 1, 128), (2, 1024, 2, 64), (1, 8192, 1, 128)]:
    q, k, v = dit_like_qkv(B, S, H, D, seed=S + D, dtype=torch.bfloat16)
    ref, rlse = oracle(q, k, v)
    for name, sch in [("per-key (SCHEME, block_n 128)", replace(SCHEME, block_n=128)),
                      ("k_block 64", replace(SCHEME, block_n=128, k_block=64)),
                      ("k_block 128", replace(SCHEME, block_n=128, k_block=128)),
                      ("block_n 256, per-key", replace(SCHEME, block_n=256)),
                      ("block_n 256, k_block 256", replace(SCHEME, block_n=256, k_block=256))]:
        t = time.time()
        out, lse = fp8_attention_ref(q, k, v, scheme=sch)
        m = attention_error_metrics(out, ref)
        le = (lse.double() - rlse.double()).abs()
        r = {"shape": [B, S, H, D], "scheme": name, **{k2: float(v2) for k2, v2 in m.items()},
             "lse_mean": float(le.mean()), "lse_max": float(le.max())}
        rows.append(r); print(json.dumps(r), f"{time.time()-t:.1f}s", flush=True)
json.dump(rows, open("/tmp/kblock.json", "w"), indent=1)
