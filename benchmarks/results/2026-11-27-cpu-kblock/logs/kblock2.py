# ruff: noqa
import sys, json
sys.path.insert(0, "/work/main")
from dataclasses import replace
import torch
from xdit_ops.reference.fp8_attention import SCHEME, fp8_attention_ref, dit_like_qkv, attention_error_metrics
from xdit_ops.reference.attention import attention_ref
torch.set_num_threads(2)
rows = []
for (B, S, H, D) in [(1, 4096, 1, 128), (1, 8192, 1, 128)]:
    q, k, v = dit_like_qkv(B, S, H, D, seed=S + D, dtype=torch.bfloat16)
    ref, rlse = attention_ref(q.double(), k.double(), v.double())
    for name, sch in [("block_n 128 per-key acc22", replace(SCHEME, block_n=128, pv_accum_bits=22)),
                      ("block_n 128 k_block 128 acc22", replace(SCHEME, block_n=128, k_block=128, pv_accum_bits=22)),
                      ("block_n 256 k_block 256 acc22", replace(SCHEME, block_n=256, k_block=256, pv_accum_bits=22))]:
        out, lse = fp8_attention_ref(q, k, v, scheme=sch)
        m = attention_error_metrics(out, ref)
        le = (lse.double() - rlse.double()).abs()
        r = {"shape": [B, S, H, D], "scheme": name, **{k2: float(v2) for k2, v2 in m.items()}, "lse_mean": float(le.mean())}
        rows.append(r); print(json.dumps(r)[:230], flush=True)
json.dump(rows, open("/tmp/kblock2.json", "w"), indent=1)
