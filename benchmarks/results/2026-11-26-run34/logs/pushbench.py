# ruff: noqa
"""Ulysses-push copy microbenchmark: how much of NVLink a peer-store copy kernel reaches.

Every rank copies a local source [W, N] bytes to W destinations at once (W-1 peers' torch
symmetric-memory buffers + its own): chunk j of rank r's source lands in rank j's buffer at bytes
[r*N, (r+1)*N). All ranks push concurrently, as usp_attention's push does. Variants: copy kernels
(16-byte vectors, different unroll / grid / destination order / cache hints), torch copy_ per
stream (cudaMemcpyAsync D2D on a peer-mapped pointer) and, for reference, NCCL all_to_all_single.

Run:  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node=4 pushbench.py
Out:  table on rank 0, JSON in $OUT_DIR/pushbench.json (default /tmp).
Timing: per rep, [symm barrier] e0 [K back-to-back pushes] e1 [symm barrier]; time = (e1-e0)/K,
median over reps per rank; the table shows the max over ranks. GB/s: remote = (W-1)*N bytes,
total = W*N bytes, per rank.
"""
import glob, json, os, shutil, statistics, sys, time


def _fix_cuda_home():
    """torch takes CUDA_HOME from `which nvcc`/.. when the variable is unset; where nvcc is a
    wrapper script (e.g. /usr/local/bin/nvcc) that dir has no libcudart and the link fails.
    Point CUDA_HOME at a real toolkit then (must run before cpp_extension is imported)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    has_rt = lambda d: bool(glob.glob(os.path.join(d, "lib*", "libcudart.so*")))
    nvcc = shutil.which("nvcc")
    if nvcc and has_rt(os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
        return
    for d in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.exists(os.path.join(d, "bin", "nvcc")) and has_rt(d):
            os.environ["CUDA_HOME"] = d
            return


_fix_cuda_home()

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
from torch.utils.cpp_extension import load_inline

T_START = time.time()
SIZES = [5_300_000, 21_000_000, 63_000_000]  # bytes per destination (4608 / 16896 / 32760 cases)
ALIGN = 1 << 16  # N rounded up to 64 KiB: 16-byte vectors, interleave tiles of up to 4096 vectors
WARMUP, REPS, K = 3, 20, 10
SLEEP_CYCLES = 4_000_000  # ~2 ms spin before each rep so the host has the rep enqueued ahead

CUDA_SRC = r"""
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>
#include <cuda_runtime.h>

namespace {
constexpr int kMaxDst = 8;
struct PushArgs {
  const uint4* src[kMaxDst];
  uint4* dst[kMaxDst];
};

template <bool CS>
__device__ __forceinline__ uint4 ld(const uint4* p) {
  if constexpr (CS) return __ldcs(p); else return *p;
}
template <bool CS>
__device__ __forceinline__ void st(uint4* p, const uint4& v) {
  if constexpr (CS) __stcs(p, v); else *p = v;
}

// U vectors per thread: base + k * blockDim.x (a warp stays coalesced), all loads then all stores.
template <int U, bool CS>
__device__ __forceinline__ void tile_linear(const uint4* s, uint4* d, int64_t base, int64_t n) {
  uint4 r[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t i = base + (int64_t)k * blockDim.x;
    r[k] = i < n ? ld<CS>(s + i) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t i = base + (int64_t)k * blockDim.x;
    if (i < n) st<CS>(d + i, r[k]);
  }
}

// mode 0: destinations one after another (order given by the caller), whole grid grid-strides
//         over each chunk;
// mode 1: grid split in ndst equal parts, part j grid-strides over chunk j only;
// mode 2: flat index over ndst * nvec vectors cut in tiles of 2^lg_tile vectors, tile t goes to
//         destination t % ndst (all destinations written at once, like the real push whose rows
//         are split across ranks by head); needs nvec % 2^lg_tile == 0.
template <int U, bool CS, bool ILV>
__global__ void __launch_bounds__(512) push_kernel(PushArgs a, int ndst, int64_t nvec, int mode,
                                                    int lg_tile) {
  __shared__ const uint4* s_src[kMaxDst];
  __shared__ uint4* s_dst[kMaxDst];
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < kMaxDst; ++j) {
      s_src[j] = a.src[j];
      s_dst[j] = a.dst[j];
    }
  }
  __syncthreads();
  const int64_t per_iter = (int64_t)blockDim.x * U;
  if constexpr (!ILV) {
    if (mode == 0) {
      for (int j = 0; j < ndst; ++j) {
        const uint4* s = s_src[j];
        uint4* d = s_dst[j];
#pragma unroll 1
        for (int64_t base = blockIdx.x * per_iter + threadIdx.x; base < nvec;
             base += gridDim.x * per_iter)
          tile_linear<U, CS>(s, d, base, nvec);
      }
    } else {
      const int bpd = gridDim.x / ndst;
      const int j = blockIdx.x / bpd;
      if (j >= ndst) return;
      const int b = blockIdx.x - j * bpd;
      const uint4* s = s_src[j];
      uint4* d = s_dst[j];
#pragma unroll 1
      for (int64_t base = b * per_iter + threadIdx.x; base < nvec; base += bpd * per_iter)
        tile_linear<U, CS>(s, d, base, nvec);
    }
  } else {
    const int64_t total = ndst * nvec;
    const int64_t mask = (int64_t(1) << lg_tile) - 1;
#pragma unroll 1
    for (int64_t base = blockIdx.x * per_iter + threadIdx.x; base < total;
         base += gridDim.x * per_iter) {
      uint4 r[U];
      uint4* dp[U];
#pragma unroll
      for (int k = 0; k < U; ++k) {
        const int64_t i = base + (int64_t)k * blockDim.x;
        dp[k] = nullptr;
        r[k] = make_uint4(0, 0, 0, 0);
        if (i < total) {
          const uint32_t t = static_cast<uint32_t>(i >> lg_tile);
          const uint32_t j = t % static_cast<uint32_t>(ndst);
          const int64_t off = (int64_t(t / static_cast<uint32_t>(ndst)) << lg_tile) | (i & mask);
          r[k] = ld<CS>(s_src[j] + off);
          dp[k] = s_dst[j] + off;
        }
      }
#pragma unroll
      for (int k = 0; k < U; ++k)
        if (dp[k] != nullptr) st<CS>(dp[k], r[k]);
    }
  }
}

// One dispatch for launch and occupancy: the instantiated (unroll, cs, interleave) set.
template <typename F>
void dispatch(int unroll, int cs, int mode, F&& f) {
  const bool ilv = mode == 2;
  if (unroll == 1 && !cs && !ilv) f(push_kernel<1, false, false>);
  else if (unroll == 1 && !cs && ilv) f(push_kernel<1, false, true>);
  else if (unroll == 4 && !cs && !ilv) f(push_kernel<4, false, false>);
  else if (unroll == 4 && !cs && ilv) f(push_kernel<4, false, true>);
  else if (unroll == 8 && !cs && !ilv) f(push_kernel<8, false, false>);
  else if (unroll == 4 && cs && !ilv) f(push_kernel<4, true, false>);
  else if (unroll == 8 && cs && !ilv) f(push_kernel<8, true, false>);
  else throw std::runtime_error("push: no kernel for this (unroll, cs, mode)");
}
}  // namespace

// resident blocks per SM of one variant at this block size (0 if it cannot launch)
int push_occupancy(int unroll, int cs, int mode, int block) {
  int n = 0;
  dispatch(unroll, cs, mode, [&](auto kern) {
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, block, 0);
  });
  return n;
}

void push_launch(int unroll, int cs, const std::vector<int64_t>& src,
                 const std::vector<int64_t>& dst, int64_t nvec, int mode, int lg_tile, int grid,
                 int block, int64_t stream) {
  const int ndst = static_cast<int>(src.size());
  if (ndst < 1 || ndst > kMaxDst || dst.size() != src.size())
    throw std::runtime_error("push: need 1..8 sources and as many destinations");
  if (mode == 1 && grid % ndst != 0) throw std::runtime_error("push: perdst grid % ndst != 0");
  if (mode == 2 && (nvec & ((int64_t(1) << lg_tile) - 1)) != 0)
    throw std::runtime_error("push: interleave needs nvec % tile == 0");
  PushArgs a{};
  for (int j = 0; j < ndst; ++j) {
    a.src[j] = reinterpret_cast<const uint4*>(src[j]);
    a.dst[j] = reinterpret_cast<uint4*>(dst[j]);
  }
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch(unroll, cs, mode, [&](auto kern) { kern<<<grid, block, 0, s>>>(a, ndst, nvec, mode, lg_tile); });
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("push: ") + cudaGetErrorString(e));
}
"""

CPP_SRC = r"""
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cstdint>
#include <vector>
void push_launch(int unroll, int cs, const std::vector<int64_t>& src,
                 const std::vector<int64_t>& dst, int64_t nvec, int mode, int lg_tile, int grid,
                 int block, int64_t stream);
int push_occupancy(int unroll, int cs, int mode, int block);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("push", &push_launch);
  m.def("occupancy", &push_occupancy);
}
"""


def build(verbose=False):
    kw = dict(name="xdit_pushbench", cpp_sources=[CPP_SRC], cuda_sources=[CUDA_SRC],
              extra_cflags=["-O2"],
              extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a",
                                 "-Xptxas=-v"] if verbose else
                                ["-O3", "-gencode=arch=compute_90a,code=sm_90a"],
              verbose=verbose)
    try:  # skip torch/extension.h (faster compile; torch >= 2.6 has the flag)
        return load_inline(**kw, no_implicit_headers=True)
    except TypeError:
        return load_inline(**kw)


def main():
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    rank, W = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    out_dir = os.environ.get("OUT_DIR", "/tmp")

    # build once on rank 0, the others load the finished build
    if rank == 0:
        t0 = time.time()
        ext = build()
        print(f"[pushbench] compiled in {time.time() - t0:.1f} s", flush=True)
    dist.barrier()
    if rank != 0:
        ext = build()
    dist.barrier()

    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    sizes = [(s + ALIGN - 1) // ALIGN * ALIGN for s in SIZES]
    nmax = max(sizes)

    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required on older torch, deprecated later
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            symm_mem.enable_symm_mem_for_group(group.group_name)
    buf = symm_mem.empty(W * nmax, dtype=torch.uint8, device=dev)
    torch.cuda.synchronize()  # the allocator's zeroing must land before any peer can signal
    handle = symm_mem.rendezvous(buf, group.group_name)
    peer = [handle.get_buffer(p, (W * nmax,), torch.uint8, 0) for p in range(W)]
    peer_ptr = [t.data_ptr() for t in peer]
    src_all = torch.empty(W * nmax, dtype=torch.uint8, device=dev)
    a2a_out = torch.empty(W * nmax, dtype=torch.uint8, device=dev)
    streams = [torch.cuda.Stream(device=dev) for _ in range(W)]
    main_s = torch.cuda.current_stream()

    def pattern(r, j, n):  # bytes rank r sends to rank j
        return ((torch.arange(n, device=dev, dtype=torch.int32) % 251 + r * 7 + j) % 256).to(
            torch.uint8)

    def barrier():
        handle.barrier(channel=0)

    # rotate destination order so rank r starts with peer r+1 (all ranks pushing into the same
    # peer first would make one receiver's ingress the limit); self last
    rot = [(rank + 1 + k) % W for k in range(W)]
    natural = list(range(W))

    # variant: (name, kind, params)
    V = []
    def kv(name, unroll, mode, bps, order="rot", cs=0, lg=0, block=256):
        V.append((name, "kernel", dict(unroll=unroll, mode=mode, bps=bps, order=order, cs=cs,
                                        lg=lg, block=block)))
    kv("grid1", 1, 0, 8)                       # (a) like ours, destinations one after another
    kv("grid1_norot", 1, 0, 8, order="nat")    # every rank pushes dst 0 first, then 1, ...
    kv("grid1_ilv2k", 1, 2, 8, lg=7)           # all dsts at once in 2 KiB tiles (closest to ours)
    kv("unroll4", 4, 0, 8)                     # (b)
    kv("unroll8", 8, 0, 8)                     # (c)
    kv("perdst_u4", 4, 1, 8)                   # (d)
    kv("perdst_u8", 8, 1, 8)
    kv("ilv2k_u4", 4, 2, 8, lg=7)
    kv("ilv64k_u4", 4, 2, 8, lg=12)
    kv("unroll4_cs", 4, 0, 8, cs=1)            # __ldcs/__stcs streaming hints
    kv("unroll8_cs", 8, 0, 8, cs=1)
    for b in (2, 4, 16):                       # (e) blocks per SM sweep for both unrolls
        kv(f"unroll4_b{b}", 4, 0, b)
        kv(f"unroll8_b{b}", 8, 0, b)
    kv("grid1_b16", 1, 0, 16)
    kv("unroll4_t512_b4", 4, 0, 4, block=512)
    kv("perdst_u4_b16", 4, 1, 16)
    V.append(("ce_copy_4streams", "ce", dict(nstreams=W)))  # torch copy_, one stream per dst
    V.append(("ce_copy_1stream", "ce", dict(nstreams=1)))
    V.append(("nccl_a2a", "nccl", {}))

    results = []  # local rows
    for n in sizes:
        nvec = n // 16
        src = src_all[: W * n].view(W, n)
        for j in range(W):
            src[j].copy_(pattern(rank, j, n))
        # rank r's chunk j -> rank j's buffer at [r*n, (r+1)*n)
        dst_ptr = [peer_ptr[j] + rank * n for j in range(W)]
        dst_view = [peer[j][rank * n:(rank + 1) * n] for j in range(W)]
        expect = [pattern(r, rank, n) for r in range(W)]  # what lands in my buffer from rank r
        torch.cuda.synchronize()

        for name, kind, p in V:
            if kind == "kernel":
                order = rot if p["order"] == "rot" else natural
                if p["mode"] == 1 and (p["bps"] * sms) % W:
                    grid = (p["bps"] * sms) // W * W
                else:
                    grid = p["bps"] * sms
                sp = [src[j].data_ptr() for j in order]
                dp = [dst_ptr[j] for j in order]
                u, mode, cs, lg, blk = p["unroll"], p["mode"], p["cs"], p["lg"], p["block"]

                def push(sp=sp, dp=dp, u=u, mode=mode, cs=cs, lg=lg, blk=blk, grid=grid):
                    ext.push(u, cs, sp, dp, nvec, mode, lg, grid, blk,
                             torch.cuda.current_stream().cuda_stream)

                def run_k(k, push=push):
                    for _ in range(k):
                        push()
                cfg = dict(p, grid=grid, resident_blocks_per_sm=ext.occupancy(u, cs, mode, blk))
            elif kind == "ce":
                ns = p["nstreams"]

                def run_k(k, ns=ns):
                    use = streams[:ns]
                    for s in use:
                        s.wait_stream(main_s)
                    for _ in range(k):
                        for i, j in enumerate(rot):
                            with torch.cuda.stream(use[i % ns]):
                                dst_view[j].copy_(src[j])
                    for s in use:
                        main_s.wait_stream(s)
                cfg = dict(p)
            else:
                a2a_in = src.reshape(-1)
                a2a_o = a2a_out[: W * n]

                def run_k(k, a2a_in=a2a_in, a2a_o=a2a_o):
                    for _ in range(k):
                        dist.all_to_all_single(a2a_o, a2a_in, group=group)
                cfg = {}

            # correctness, once per variant
            if kind == "nccl":
                a2a_out.zero_()
                run_k(1)
                torch.cuda.synchronize()
                got = a2a_out[: W * n].view(W, n)
            else:
                buf.zero_()
                barrier()  # every buffer zeroed before anyone writes
                run_k(1)
                barrier()  # every rank's push has landed
                torch.cuda.synchronize()
                dist.barrier()
                got = buf[: W * n].view(W, n)
            bad = [r for r in range(W) if not torch.equal(got[r], expect[r])]
            if bad:
                print(f"[pushbench] rank {rank}: WRONG DATA variant {name} N={n} from ranks {bad}",
                      file=sys.stderr, flush=True)
                dist.destroy_process_group()
                sys.exit(1)

            # warmup
            for _ in range(WARMUP):
                barrier()
                run_k(1)
            barrier()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(REPS)]
            for e0, e1 in ev:
                torch.cuda._sleep(SLEEP_CYCLES)
                barrier()
                e0.record()
                run_k(K)
                e1.record()
                barrier()
            torch.cuda.synchronize()
            us = [e0.elapsed_time(e1) * 1e3 / K for e0, e1 in ev]
            results.append(dict(rank=rank, variant=name, kind=kind, n=n, cfg=cfg,
                                us_median=statistics.median(us), us_min=min(us),
                                us_max=max(us)))
            dist.barrier()
            if rank == 0 and time.time() - T_START > 80:
                print(f"[pushbench] warning: {time.time() - T_START:.0f} s elapsed", flush=True)

    allres = [None] * W
    dist.all_gather_object(allres, results)
    if rank == 0:
        rows = []
        hdr = (f"{'variant':18s} {'N/dst MB':>8s} {'us(max rk)':>10s} {'us min':>8s} "
               f"{'remote GB/s':>11s} {'total GB/s':>10s} {'grid':>5s} {'res/SM':>6s}  per-rank median us")
        print(f"[pushbench] {torch.cuda.get_device_name()} x{W}, {sms} SMs, torch "
              f"{torch.__version__}; GB/s per rank, from the max over ranks of the median")
        for idx in range(len(results)):
            per = [allres[r][idx] for r in range(W)]
            assert all(x["variant"] == per[0]["variant"] and x["n"] == per[0]["n"] for x in per)
            n = per[0]["n"]
            t = max(x["us_median"] for x in per)
            row = dict(variant=per[0]["variant"], kind=per[0]["kind"], cfg=per[0]["cfg"],
                       n_per_dst=n, remote_bytes=(W - 1) * n, total_bytes=W * n,
                       us_max_over_ranks=t, us_min_any=min(x["us_min"] for x in per),
                       gbps_remote=(W - 1) * n / t / 1e3, gbps_total=W * n / t / 1e3,
                       per_rank_us_median=[x["us_median"] for x in per],
                       per_rank_us_min=[x["us_min"] for x in per],
                       per_rank_us_max=[x["us_max"] for x in per])
            rows.append(row)
            if idx % len(V) == 0:
                print(hdr)
            print(f"{row['variant']:18s} {n / 1e6:8.2f} {t:10.1f} {row['us_min_any']:8.1f} "
                  f"{row['gbps_remote']:11.1f} {row['gbps_total']:10.1f} "
                  f"{str(row['cfg'].get('grid', '-')):>5s} "
                  f"{str(row['cfg'].get('resident_blocks_per_sm', '-')):>6s}  "
                  + " ".join(f"{x:.1f}" for x in row["per_rank_us_median"]))
        meta = dict(gpu=torch.cuda.get_device_name(), world=W, sms=sms, torch=torch.__version__,
                    cuda=torch.version.cuda, warmup=WARMUP, reps=REPS, back_to_back=K,
                    timing="per rep: symm barrier, event, K pushes, event, symm barrier; "
                           "us = median over reps of (event span / K); table = max over ranks",
                    env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE",
                                                        "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
                    wall_s=time.time() - T_START)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "pushbench.json")
        with open(path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"[pushbench] wrote {path}; wall {time.time() - T_START:.1f} s", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--build-only":
        build(verbose=True)
        print("build ok")
    else:
        main()
