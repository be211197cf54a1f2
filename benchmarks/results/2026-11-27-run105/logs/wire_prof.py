"""Where the FP8 wire's eager host time goes (run 105): cProfile of 20 eager usp_attention calls
with XDIT_OPS_USP_FP8_WIRE=1 and backend fp8 on rank 0 of 2, at (1,4608,24,128) (2304 tokens a
rank), after 5 warm-up calls; the GPU is kept busy by a queued sleep so no call waits for it.
Usage: torchrun --nproc-per-node=2 wire_prof.py OUT_DIR"""
import cProfile
import io
import os
import pstats
import sys
from pathlib import Path

import torch
import torch.distributed as dist

os.environ["XDIT_OPS_USP_FP8_WIRE"] = "1"
import xdit_ops  # noqa: E402
from xdit_ops.reference.fp8_attention import dit_like_qkv  # noqa: E402

local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
rank = dist.get_rank()
xdit_ops.init_parallel(ulysses_degree=2)
q, k, v = (t.cuda() for t in dit_like_qkv(1, 2304, 24, 128, seed=rank, dtype=torch.bfloat16))
for _ in range(5):
    xdit_ops.usp_attention(q, k, v, backend="fp8")
torch.cuda.synchronize()
dist.barrier()
torch.cuda._sleep(int(4e9))
prof = cProfile.Profile()
prof.enable()
for _ in range(20):
    xdit_ops.usp_attention(q, k, v, backend="fp8")
prof.disable()
torch.cuda.synchronize()
if rank == 0:
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s).sort_stats("cumulative")
    st.print_stats(45)
    s.write("\n--- by own time\n")
    st.sort_stats("tottime").print_stats(25)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "wire_prof.txt").write_text(s.getvalue())
    print(s.getvalue()[:6000])
xdit_ops.destroy_parallel()
dist.destroy_process_group()
