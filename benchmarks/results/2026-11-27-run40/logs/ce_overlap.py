# ruff: noqa
# Does a copy-engine (CE) exchange overlap a full-GPU cuDNN attention without slowing it?
# One process drives all visible GPUs (peer access on). Per GPU d, the Ulysses input exchange of
# (1, S, H, D) bf16 sharded S/N rows per GPU: to every peer p the rows [S/N, heads of p] of q, k,
# v, as 2-D copies (strided source rows, contiguous destination) on one stream per peer, with C
# head chunks. Timed: attention alone (all GPUs at once), copies alone, both at once.
import ctypes, glob, os, sys, statistics, json
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend


def cudart():
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    for p in sys.path:
        for f in glob.glob(os.path.join(p, "nvidia", "*", "lib", "libcudart.so*")) + glob.glob(
                os.path.join(p, "nvidia", "cuda_runtime", "lib", "libcudart.so*")):
            return ctypes.CDLL(f)
    raise OSError("no libcudart")


rt = cudart()
rt.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                 ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
rt.cudaMemcpy2DAsync.restype = ctypes.c_int
rt.cudaDeviceEnablePeerAccess.argtypes = [ctypes.c_int, ctypes.c_uint]
N = torch.cuda.device_count()
for d in range(N):
    torch.cuda.set_device(d)
    for p in range(N):
        if p != d:
            rc = rt.cudaDeviceEnablePeerAccess(p, 0)
            assert rc in (0, 704), rc  # 704: already enabled
torch.cuda.set_device(0)

out_rows = []
shapes = [(4608, 24, 128), (16896, 24, 128), (32760, 40, 128)]
for S, H, D in shapes:
    L = S // N
    h = H // N
    dev = [torch.device("cuda", d) for d in range(N)]
    src = [[torch.randn(1, L, H, D, device=dev[d], dtype=torch.bfloat16) for _ in range(3)] for d in range(N)]
    # receive buffer on d: [3, S, h, D] (rows of source p at [p*L, (p+1)*L)); per chunk layout
    # keeps the chunk's heads contiguous per row only when C == 1; for C > 1 we land chunk c
    # in its own region [C][3][S][hc][D].
    attn_in = [[torch.randn(1, h, S, D, device=dev[d], dtype=torch.bfloat16) for _ in range(3)] for d in range(N)]
    streams = [[torch.cuda.Stream(device=dev[d]) for _ in range(N)] for d in range(N)]
    comp = [torch.cuda.current_stream(dev[d]) for d in range(N)]

    def attention(d):
        with torch.cuda.device(d), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            q, k, v = attn_in[d]
            return F.scaled_dot_product_attention(q, k, v)

    def copies(C, recv, twod=True):
        hc = h // C
        for d in range(N):
          with torch.cuda.device(d):
            for p in range(N):
                if p == d:
                    continue
                s = streams[d][p]
                for c in range(C):
                    for i in range(3):
                        srct = src[d][i]
                        base = srct.data_ptr() + (p * h + c * hc) * D * 2
                        dstt = recv[p]
                        # recv[p]: [C, 3, S, hc, D]
                        off = ((c * 3 + i) * S + d * L) * hc * D * 2
                        rc = rt.cudaMemcpy2DAsync(ctypes.c_void_p(dstt.data_ptr() + off), hc * D * 2,
                                                  ctypes.c_void_p(base), H * D * 2, hc * D * 2, L, 4,
                                                  ctypes.c_void_p(s.cuda_stream))
                        assert rc == 0, rc

    def timed(fn, reps=5):
        ts = []
        for _ in range(reps):
            for d in range(N):
                torch.cuda.synchronize(d)
            st = [torch.cuda.Event(enable_timing=True) for _ in range(N)]
            en = [torch.cuda.Event(enable_timing=True) for _ in range(N)]
            for d in range(N):
                st[d].record(comp[d])
                for s in streams[d]:
                    s.wait_stream(comp[d])
            fn()
            for d in range(N):
                for s in streams[d]:
                    comp[d].wait_stream(s)
                en[d].record(comp[d])
            for d in range(N):
                torch.cuda.synchronize(d)
            ts.append(max(st[d].elapsed_time(en[d]) for d in range(N)))
        return statistics.median(ts[1:])

    recv = [torch.empty(8, 3, S, h, D, device=dev[d], dtype=torch.bfloat16).view(-1) for d in range(N)]
    moved = 3 * (N - 1) * L * h * D * 2  # bytes out of one GPU
    t_attn = timed(lambda: [attention(d) for d in range(N)])
    row = {"S": S, "H": H, "D": D, "gpus": N, "attn_ms": t_attn, "bytes_out_per_gpu": moved,
           "gpu": torch.cuda.get_device_name(0)}
    for C in (1, 2, 5) if h % 5 == 0 else (1, 2, 3):
        if h % C:
            continue
        t_cp = timed(lambda: copies(C, recv))
        t_both = timed(lambda: ([attention(d) for d in range(N)], copies(C, recv)))
        row[f"ce2d_c{C}_ms"] = t_cp
        row[f"ce2d_c{C}_GBps"] = moved / t_cp / 1e6
        row[f"both_c{C}_ms"] = t_both
    out_rows.append(row)
    print(json.dumps(row), flush=True)
    del src, attn_in, recv
    torch.cuda.empty_cache()

if len(sys.argv) > 1:
    json.dump(out_rows, open(sys.argv[1], "w"), indent=1)
