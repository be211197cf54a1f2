# ruff: noqa
"""Which C++ TORCH_CHECK failures of xdit_ops' CUDA ops raise, and which crash the process?
Each case runs in its own subprocess; prints rc and the last line of stderr."""
import subprocess, sys

CASES = {
    "aten_mm_shape": "torch.mm(torch.ones(2,3,device='cuda'), torch.ones(2,3,device='cuda'))",
    "pack_heads_sum": "q=torch.ones(1,4,6,8,device='cuda'); torch.ops.xdit_ops.ulysses_pack_qkv.default(q,q,q,[1,1])",
    "push_dst_small": "q=torch.ones(1,4,2,8,device='cuda'); torch.ops.xdit_ops.ulysses_push_qkv.default(q,q,q,[1,1],[q.new_zeros(4),q.new_zeros(4)],0,0,0)",
    "push_rank_bad": "q=torch.ones(1,4,2,8,device='cuda'); torch.ops.xdit_ops.ulysses_push_qkv.default(q,q,q,[1,1],[q.new_zeros(4096),q.new_zeros(4096)],5,0,0)",
    "push_out_bad": "o=torch.ones(1,8,1,8,device='cuda'); torch.ops.xdit_ops.ulysses_push_out.default(o,[1,1],[o.new_zeros(4)],0,4,True)",
    "unpack_bad": "r=torch.ones(10,device='cuda'); torch.ops.xdit_ops.ulysses_unpack_out.default(r,[1,1],1,0,4,True)",
    "gather_rows_bad": "x=torch.ones(4,3,device='cuda'); print(torch.ops.xdit_ops.gather_rows)",
}
pre = "import torch, xdit_ops, xdit_ops.ops.ulysses_pack\n"
for name, body in CASES.items():
    code = pre + "try:\n    " + body + "\n    print('NO ERROR')\nexcept Exception as e:\n    print('RAISED', type(e).__name__, str(e).splitlines()[0][:150])\n"
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=120)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    err = [l for l in p.stderr.strip().splitlines() if l.strip()][:3]
    print(f"{name}: rc={p.returncode} out={last!r} err={err}", flush=True)
