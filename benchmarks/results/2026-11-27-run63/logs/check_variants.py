# Session 14, run 63 (branch fp8-exp): the experimental kernel variants give the bits of the
# 2-consumer ping-pong kernel (bf16): 2 consumers issuing freely at Dp 64 and 128, and 3
# consumers keeping P.V beside the softmax (consumers=13) at Dp 64.
import torch

from xdit_ops.ops.fp8_attention import attention_quantized_sm90
from xdit_ops.reference.fp8_attention import (
    dit_like_qkv,
    in_pv_order,
    quantize_qkv_ref,
    scheme_variant,
)

bad = 0
for B, Sq, Sk, H, D in [(2, 1000, 1531, 3, 64), (1, 193, 4097, 2, 40), (2, 700, 300, 2, 128),
                        (1, 4097, 4097, 2, 96)]:
    q, k, v = dit_like_qkv(B, max(Sq, Sk), H, D, seed=Sq, dtype=torch.bfloat16, device="cuda")
    q, k, v = q[:, :Sq], k[:, :Sk], v[:, :Sk]
    qq = in_pv_order(quantize_qkv_ref(q, k, v, scheme=scheme_variant(k_block=128)))
    o2, l2 = attention_quantized_sm90(qq, torch.bfloat16, True, "sm90ws", k_scale="tile")
    variants = [(2, False)] + ([(13, False)] if D <= 64 else [])
    for c, pp in variants:
        o, lse = attention_quantized_sm90(qq, torch.bfloat16, True, "sm90ws", k_scale="tile",
                                          consumers=c, ping_pong=pp)
        ok = torch.equal(o, o2) and torch.equal(lse, l2)
        bad += not ok
        print((B, Sq, Sk, H, D), (c, pp), "equal" if ok else
              f"DIFFER max {(o.float() - o2.float()).abs().max().item():.3e}")
print("variants:", "all equal" if bad == 0 else f"{bad} differ")
