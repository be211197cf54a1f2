# ruff: noqa
# ncu target: xdit_ops.fp8_attention (auto: sm90ws, per-tile K scale at hd128) at one shape, a few calls.
import sys, torch, xdit_ops
B, S, H, D = (int(x) for x in sys.argv[1].split(","))
g = torch.Generator(device="cuda"); g.manual_seed(0)
q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
for _ in range(4):
    o = xdit_ops.fp8_attention(q, k, v)
torch.cuda.synchronize(); print("ok", o.shape)
