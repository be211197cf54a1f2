# ruff: noqa: E501  (kept as run in call 7)
"""Run 27: does a push call whose LSE exchange is the group's first NCCL use hang?
torchrun --nproc-per-node=2 repro.py fix|nofix"""
import faulthandler
import os
import sys

import torch

import xdit_ops

usp = sys.modules["xdit_ops.ops.usp_attention"]
faulthandler.dump_traceback_later(35, exit=True)
os.environ["XDIT_OPS_USP_ULYSSES"] = "push"
if sys.argv[1] == "nofix":
    usp._ensure_communicator = lambda group, device: None
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
xdit_ops.init_parallel(ulysses_degree=2)
for S, H, D in ((4098, 30, 64), (4096, 24, 128), (2048, 24, 72)):
    q, k, v = (torch.randn(1, S // 2, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = xdit_ops.usp_attention(q, k, v, return_lse=True)
    torch.cuda.synchronize()
    print(sys.argv[1], "rank", local, "shape", (S, H, D), "ok", float(out.float().abs().mean()), flush=True)
xdit_ops.destroy_parallel()
