"""The nodes of usp_attention's call graphs (ring-only and Ulysses-only on every rank, (1,4608,
24,128), after the graph exists): per node its type and, for kernels, the kernel's name (driver
API through ctypes), and the host time of one launch of that graph (median, GPU kept busy).
    torchrun --nproc-per-node=N graph_nodes.py"""
import ctypes
import importlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import xdit_ops

_usp = importlib.import_module("xdit_ops.ops.usp_attention")
cu = ctypes.CDLL("libcuda.so.1")
TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty",
         6: "wait_event", 7: "event_record", 8: "ext_sem_signal", 9: "ext_sem_wait",
         10: "mem_alloc", 11: "mem_free", 12: "batch_mem_op", 13: "conditional"}


class KParams(ctypes.Structure):
    _fields_ = [("func", ctypes.c_void_p), ("grid", ctypes.c_uint * 3),
                ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("params", ctypes.c_void_p), ("extra", ctypes.c_void_p),
                ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


def nodes_of(graph_ptr):
    n = ctypes.c_size_t(0)
    assert cu.cuGraphGetNodes(ctypes.c_void_p(graph_ptr), None, ctypes.byref(n)) == 0
    arr = (ctypes.c_void_p * n.value)()
    assert cu.cuGraphGetNodes(ctypes.c_void_p(graph_ptr), arr, ctypes.byref(n)) == 0
    out = []
    for node in arr:
        t = ctypes.c_int(-1)
        cu.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t))
        name = ""
        if t.value == 0:
            kp = KParams()
            rc = cu.cuGraphKernelNodeGetParams_v2(ctypes.c_void_p(node), ctypes.byref(kp))
            s = ctypes.c_char_p()
            if rc == 0 and kp.func:
                cu.cuFuncGetName(ctypes.byref(s), ctypes.c_void_p(kp.func))
            elif rc == 0 and kp.kern:
                cu.cuKernelGetName(ctypes.byref(s), ctypes.c_void_p(kp.kern))
            name = (s.value or b"?").decode()[:90]
        out.append((TYPES.get(t.value, str(t.value)), name))
    return out


def host_us(fn, n=60):
    hs = []
    for _ in range(n):
        torch.cuda._sleep(int(5e6))
        t0 = time.perf_counter()
        fn()
        hs.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(hs)


dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(rank)
res = {}
for name, (u, r) in (("ring", (1, world)), ("ulysses", (world, 1))):
    _usp.release_call_graphs()
    xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r)
    q, k, v = (torch.randn(1, 4608 // world, 24, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    for _ in range(4):
        xdit_ops.usp_attention(q, k, v)
    torch.cuda.synchronize()
    (g,) = [s for p in _usp._PLANS.values() for s in p.graphs.values()
            if isinstance(s, _usp._CallGraph)]
    nodes = nodes_of(g.graph.raw_cuda_graph())
    counts = {}
    for t, _ in nodes:
        counts[t] = counts.get(t, 0) + 1
    res[name] = {"nodes": len(nodes), "types": counts, "list": nodes,
                 "replay_host_us": host_us(g.graph.replay),
                 "call_host_us": host_us(lambda q=q, k=k, v=v: xdit_ops.usp_attention(q, k, v))}
    if rank == 0:
        print(name, len(nodes), counts, "replay", round(res[name]["replay_host_us"], 1),
              "call", round(res[name]["call_host_us"], 1), flush=True)
        for t, n in nodes:
            print("   ", t, n)
if rank == 0:
    with open(os.path.join(os.environ.get("OUT", "."), "graph_nodes.json"), "w") as f:
        json.dump(res, f, indent=1)
xdit_ops.destroy_parallel()
