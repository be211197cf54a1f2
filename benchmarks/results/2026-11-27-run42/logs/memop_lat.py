# ruff: noqa
# Stream time of flag operations on one GPU: n (write 1, wait == 1, write 0) triples on the current
# stream, one driver call each vs one cuStreamBatchMemOp, eager and from a CUDA graph.
import json, os, sys, torch
import xdit_ops
from xdit_ops.ops.stream_memops import WAIT, WRITE, run_memops, word_address
f = torch.zeros(64, dtype=torch.int32, device="cuda")
rows = []
def prog(n):
    p = []
    for i in range(n):
        a = word_address(f, i % 64)
        p += [WRITE, a, 1, WAIT, a, 1, WRITE, a, 0]
    return p
for batch in ("0", "1"):
    os.environ["XDIT_OPS_MEMOPS_BATCH"] = batch
    for n in (8, 32):
        pr = prog(n)
        for _ in range(3):
            run_memops(f, pr)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(10):
            a.record(); run_memops(f, pr); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1e3)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
            run_memops(f, pr)
        torch.cuda.current_stream().wait_stream(s)
        gs = []
        for _ in range(10):
            a.record(); g.replay(); b.record(); torch.cuda.synchronize(); gs.append(a.elapsed_time(b) * 1e3)
        r = {"batched": batch == "1", "ops": 3 * n, "eager_us": sorted(ts)[5], "graph_us": sorted(gs)[5],
             "gpu": torch.cuda.get_device_name()}
        r["eager_us_per_op"] = r["eager_us"] / r["ops"]; r["graph_us_per_op"] = r["graph_us"] / r["ops"]
        rows.append(r); print(json.dumps(r), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
