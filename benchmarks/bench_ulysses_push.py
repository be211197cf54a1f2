"""The Ulysses push kernels on N GPUs: v1, v2, v3's output push, and a flat copy of the same bytes.

# xdit-bench: torchrun

For each full-sequence shape (B, S, H, D), bf16, split as usp_attention splits it (L = S / N
rows per rank, ``head_split`` heads per rank, no joint rows), every rank of one torchrun job
stores into every rank's torch symmetric-memory buffer (peer-mapped, no multicast; made by
``usp_attention._symm_buffer``, the helper the op's push uses):

* ``push`` (``xdit_ops::ulysses_push_qkv``): this rank's q, k, v rows of every destination's
  heads into that rank's query and K/V buffers, with ``XDIT_OPS_PUSH_KERNEL=v1`` and ``v2``;
* ``push_out`` (``xdit_ops::ulysses_push_out``): an attention output ``[B, N*L, h, D]`` (the
  ``[B, h, S, D]`` layout transposed, as attention leaves it) into every rank's
  ``[B, L, H, D]`` output, v1 and v2; ``v3``: what ``usp_attention`` runs under
  ``XDIT_OPS_PUSH_KERNEL=v3``, ``xdit_ops::ulysses_push_out_blocks`` (this rank's block
  ``[B, L, h, D]`` of the output all-to-all's receive layout, one contiguous run per
  destination); ``v2_contig_src``: v2 from a contiguous ``[B, N*L, h, D]`` copy of the output
  (a diagnostic: the source's layout against the destination's);
* ``out_copy``: what each rank does with its output buffer after the last barrier: ``clone``
  (v1/v2: a copy of ``[B, L, H, D]``) or ``unpack`` (v3: ``xdit_ops::ulysses_unpack_out`` of
  the rank blocks), and ``push_out+copy``, derived rows: the sum of the two medians (v2 + clone
  against v3 + unpack), what the output step costs ``usp_attention`` besides its barrier;
* ``flat`` copies of the same bytes per destination (the push's, then the output push's): each
  rank copies a contiguous local ``[N, n]`` byte buffer, chunk j into rank j's buffer at bytes
  ``[rank*n, (rank+1)*n)`` (every rank starts with its next peer), with two kernels compiled
  here (``torch.utils.cpp_extension.load_inline``): ``flat_u1`` (the whole grid on one
  destination after another, one 16-byte vector per thread per step) and ``flat_perdst_u8``
  (neighbouring blocks on different destinations, 8 vectors in flight per thread). Without a
  compiler the flat rows are left out (said on stdout and in the JSON meta).

Before timing, every rank checks what landed in its own buffers from all ranks, for each
kernel, against the layout computed from every rank's inputs (regenerated here from their
seeds): ``correct`` in the rows.

Timing: every iteration is a device barrier of the symmetric memory (all ranks in lock-step;
outside the timed span), then CUDA events around the one kernel; the host is kept ahead of the
GPU by a spin (``torch.cuda._sleep``) before every 10 iterations, so a launch never waits for
Python. Candidates of one shape are timed in interleaved rounds. Reported per rank: the median
over all timed iterations; in the rows: ``us`` = the slowest rank's median (``us_per_rank``
lists all), ``gbps_per_dest`` = bytes per destination / us, ``gbps_remote`` = the bytes this
rank sends to its N - 1 peers / us (the NVLink egress of one GPU), ``vs_v1`` for v2 and v3,
``vs_v2`` for the other push-out rows.

    torchrun --nproc-per-node=4 benchmarks/bench_ulysses_push.py [--out DIR] [--quick]
        [--shapes 0,2] [--no-flat]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from pathlib import Path

# multicast off before torch touches symmetric memory (GPU.md: never multimem on these hosts)
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xdit_ops  # noqa: E402, F401  (registers the ops)
from benchmarks.common import (  # noqa: E402
    add_common_args,
    iters_of,
    native_gpu_missing,
    print_table,
    write_json,
)
from xdit_ops.ops.ulysses_pack import (  # noqa: E402
    PUSH_KERNEL_ENV,
    push_region_size,
    ulysses_unpack_out,
)
from xdit_ops.ops.usp_attention import (  # noqa: E402
    _symm_buffer,
    head_split,
    release_symmetric_buffers,
)

SHAPES = [(1, 4608, 24, 128), (1, 16896, 24, 128), (1, 32760, 40, 128)]
DTYPE = torch.bfloat16
SPIN_CYCLES = 5_000_000  # ~3 ms: longer than the host needs to enqueue 10 iterations
PER_SPIN = 10
BARRIER_TIMEOUT_MS = 120_000

FLAT_CUDA = r"""
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>
#include <cuda_runtime.h>

namespace {
constexpr int kMaxDst = 8;
struct FlatArgs {
  const uint4* src[kMaxDst];
  uint4* dst[kMaxDst];
};

// Destinations one after another (in the order given); the whole grid strides over each.
__global__ void flat_u1(const __grid_constant__ FlatArgs a, int ndst, long long nvec) {
  for (int j = 0; j < ndst; ++j) {
    const uint4* s = a.src[j];
    uint4* d = a.dst[j];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nvec;
         i += (long long)gridDim.x * blockDim.x) {
      d[i] = s[i];
    }
  }
}

// Block b serves destination b % ndst; 8 loads in flight per thread before the stores.
__global__ void flat_perdst_u8(const __grid_constant__ FlatArgs a, int ndst, long long nvec) {
  constexpr int kU = 8;
  const int j = blockIdx.x % ndst;
  const long long b = blockIdx.x / ndst, nb = gridDim.x / ndst;
  const uint4* s = a.src[j];
  uint4* d = a.dst[j];
  for (long long base = b * blockDim.x * kU + threadIdx.x; base < nvec;
       base += nb * blockDim.x * kU) {
    uint4 r[kU];
#pragma unroll
    for (int k = 0; k < kU; ++k) {
      const long long i = base + (long long)k * blockDim.x;
      if (i < nvec) r[k] = s[i];
    }
#pragma unroll
    for (int k = 0; k < kU; ++k) {
      const long long i = base + (long long)k * blockDim.x;
      if (i < nvec) d[i] = r[k];
    }
  }
}
}  // namespace

void flat_copy(int variant, const std::vector<int64_t>& src, const std::vector<int64_t>& dst,
               int64_t nvec, int grid, int64_t stream) {
  const int ndst = static_cast<int>(src.size());
  if (ndst < 1 || ndst > kMaxDst || dst.size() != src.size() || grid < ndst) {
    throw std::runtime_error("flat_copy: need 1..8 sources, as many destinations, grid >= ndst");
  }
  FlatArgs a{};
  for (int j = 0; j < ndst; ++j) {
    a.src[j] = reinterpret_cast<const uint4*>(src[j]);
    a.dst[j] = reinterpret_cast<uint4*>(dst[j]);
  }
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (variant == 0) {
    flat_u1<<<grid, 256, 0, s>>>(a, ndst, nvec);
  } else {
    flat_perdst_u8<<<grid / ndst * ndst, 256, 0, s>>>(a, ndst, nvec);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("flat_copy: ") + cudaGetErrorString(e));
  }
}
"""

FLAT_CPP = r"""
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cstdint>
#include <vector>
void flat_copy(int variant, const std::vector<int64_t>& src, const std::vector<int64_t>& dst,
               int64_t nvec, int grid, int64_t stream);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("flat_copy", &flat_copy); }
"""
FLAT_VARIANTS = {"flat_u1": 0, "flat_perdst_u8": 1}


def _cuda_home() -> None:
    """Point CUDA_HOME at a toolkit with libcudart when unset (torch otherwise derives it from
    ``which nvcc``, which may be a wrapper outside the toolkit)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for d in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.exists(os.path.join(d, "bin", "nvcc")) and glob.glob(
                os.path.join(d, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = d
            return


def _build_flat():
    _cuda_home()
    from torch.utils.cpp_extension import load_inline

    kw = dict(name="xdit_bench_flat_copy", cpp_sources=[FLAT_CPP], cuda_sources=[FLAT_CUDA],
              extra_cflags=["-O2"],
              extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"])
    try:  # without torch/extension.h: seconds instead of a minute (torch >= 2.6)
        return load_inline(**kw, no_implicit_headers=True)
    except TypeError:
        return load_inline(**kw)


def load_flat(rank: int):
    """The flat-copy module on every rank, or None on every rank (rank 0 compiles first, the
    others load its build; the outcome is agreed, so all ranks run the same sequence)."""
    ext, why = None, ""
    if rank == 0:
        t0 = time.time()
        try:
            ext = _build_flat()
            print(f"[bench_ulysses_push] flat-copy kernels compiled in {time.time() - t0:.1f} s",
                  flush=True)
        except Exception as e:  # a missing compiler only drops the flat rows
            why = f"{type(e).__name__}: {str(e)[-400:]}"
    ok = [why == ""]
    dist.broadcast_object_list(ok, src=0)
    if not ok[0]:
        if rank == 0:
            print(f"[bench_ulysses_push] no flat-copy rows: {why}", flush=True)
        return None
    if rank != 0:
        try:
            ext = _build_flat()
        except Exception as e:
            why = f"rank {rank}: {type(e).__name__}: {str(e)[-400:]}"
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, why)
    bad = [w for w in flags if w]
    if bad:
        if rank == 0:
            print(f"[bench_ulysses_push] no flat-copy rows: {bad[0]}", flush=True)
        return None
    return ext


def rank_inputs(r: int, B: int, L: int, H: int, D: int, h_r: int, U: int, device):
    """Rank r's q, k, v [B, L, H, D] and attention output [B, U*L, h_r, D] (transposed
    [B, h_r, U*L, D]), from a seed of r: every rank can rebuild every rank's inputs."""
    g = torch.Generator(device=device)
    g.manual_seed(1000 + r)
    qkv = [torch.randn(B, L, H, D, device=device, dtype=DTYPE, generator=g) for _ in range(3)]
    o = torch.randn(B, h_r, U * L, D, device=device, dtype=DTYPE, generator=g).transpose(1, 2)
    return qkv, o


def flat_pattern(r: int, j: int, n: int, device) -> torch.Tensor:
    """The n bytes rank r sends to rank j in the flat copy."""
    return ((torch.arange(n, device=device, dtype=torch.int32) % 251 + 7 * r + j) % 256).to(
        torch.uint8)


def timed(fn, env: str | None, iters: int, barrier) -> list[float]:
    """Per-iteration microseconds of fn (see the module docstring)."""
    if env is not None:
        os.environ[PUSH_KERNEL_ENV] = env
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for i, (e0, e1) in enumerate(events):
        if i % PER_SPIN == 0:
            torch.cuda._sleep(SPIN_CYCLES)
        barrier()
        e0.record()
        fn()
        e1.record()
    barrier()
    torch.cuda.synchronize()
    return [e0.elapsed_time(e1) * 1e3 for e0, e1 in events]


def gather_floats(x: float, device) -> list[float]:
    t = torch.tensor([x], device=device, dtype=torch.float64)
    out = torch.empty(dist.get_world_size(), device=device, dtype=torch.float64)
    dist.all_gather_into_tensor(out, t)
    return out.tolist()


def all_true(flag: bool, device) -> bool:
    t = torch.tensor([0 if flag else 1], device=device, dtype=torch.int32)
    dist.all_reduce(t)
    return int(t.item()) == 0


def bench_shape(shape, U, me, device, group, flat, warmup, iters, rounds) -> list[dict]:
    B, S, H, D = shape
    L = S // U
    heads = head_split(H, U)
    h_me, h0 = heads[me], sum(heads[:me])
    es = torch.finfo(DTYPE).bits // 8
    n_in = push_region_size(B, L, U, 0, 0, max(heads), D)  # elements, largest head share
    n_out = B * L * H * D
    push_bytes = [3 * B * L * h * D * es for h in heads]  # this rank -> rank j (push)
    out_bytes = B * L * h_me * D * es  # this rank -> every rank (push-out)
    flat_sizes = {"push": push_bytes[me] // 16 * 16, "push_out": out_bytes // 16 * 16}
    flat_need = U * max(flat_sizes.values()) // es + 1
    total = max(n_in + n_out, flat_need)
    buf, handle = _symm_buffer(group, f"bench_ulysses_push:{total}", (total,), DTYPE, device)
    ins = [handle.get_buffer(j, (n_in,), DTYPE, 0) for j in range(U)]
    outs = [handle.get_buffer(j, (n_out,), DTYPE, n_in) for j in range(U)]
    peer_u8 = [handle.get_buffer(j, (total * es,), torch.uint8, 0) for j in range(U)]

    def barrier():
        # a rank that died mid-run leaves the others here: trap after 2 minutes instead of
        # hanging (the job then fails as a whole)
        handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)

    qkv, o = rank_inputs(me, B, L, H, D, h_me, U, device)

    def push():
        torch.ops.xdit_ops.ulysses_push_qkv.default(*qkv, heads, ins, me, 0, 0)

    def push_out():
        torch.ops.xdit_ops.ulysses_push_out.default(o, heads, outs, me, L, True)

    o_contig = o.contiguous()  # [B, U*L, h, D]: rows of h * D contiguous elements

    def push_out_contig():
        torch.ops.xdit_ops.ulysses_push_out.default(o_contig, heads, outs, me, L, True)

    def push_out_blocks():
        torch.ops.xdit_ops.ulysses_push_out_blocks.default(o, heads, outs, me, L)

    # what must land in this rank's buffers: its heads of every rank's rows
    nq = B * U * L * h_me * D
    want_q = torch.empty(B, U * L, h_me, D, device=device, dtype=DTYPE)
    want_kv = torch.empty(2, B, U * L, h_me, D, device=device, dtype=DTYPE)
    want_out = torch.empty(B, L, H, D, device=device, dtype=DTYPE)
    for r in range(U):
        (q_r, k_r, v_r), o_r = rank_inputs(r, B, L, H, D, heads[r], U, device)
        rows = slice(r * L, (r + 1) * L)
        hs = slice(h0, h0 + h_me)
        want_q[:, rows] = q_r[:, :, hs]
        want_kv[0, :, rows] = k_r[:, :, hs]
        want_kv[1, :, rows] = v_r[:, :, hs]
        want_out[:, :, sum(heads[:r]):sum(heads[:r + 1])] = o_r[:, me * L:(me + 1) * L]
        del q_r, k_r, v_r, o_r
    got_q = buf[:nq].view(B, U * L, h_me, D)
    got_kv = buf[nq:nq + 2 * nq].view(2, B, U * L, h_me, D)
    got_out = buf[n_in:n_in + n_out].view(B, L, H, D)
    # v3: rank r's block [B, L, heads[r], D] (its heads of this rank's rows), blocks in r order
    want_blocks = torch.cat([want_out[:, :, sum(heads[:r]):sum(heads[:r + 1])].reshape(-1)
                             for r in range(U)])
    got_flat = buf[n_in:n_in + n_out]

    def out_clone():
        return got_out.clone()

    def out_unpack():
        return ulysses_unpack_out(got_flat, heads, B, 0, L, True)

    def check(fn, env, region, want, after=None) -> bool:
        """fn's stores from every rank against want; ``after`` (the copy out of the buffer) is
        then checked against want_out."""
        os.environ[PUSH_KERNEL_ENV] = env
        buf.fill_(float("nan"))
        barrier()  # every buffer poisoned before anyone stores
        fn()
        barrier()  # every rank's stores have landed
        torch.cuda.synchronize()
        ok = all(torch.equal(g, w) for g, w in zip(region(), want, strict=True))
        if after is not None:
            ok = ok and torch.equal(after(), want_out)
        return all_true(ok, device)

    # flat copies: local [U, n] sources, chunk j -> rank j's buffer at bytes [me*n, (me+1)*n)
    rot = [(me + 1 + k) % U for k in range(U)]
    flat_calls, flat_ok = {}, {}
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if flat is not None:
        for what, n in flat_sizes.items():
            src = torch.stack([flat_pattern(me, j, n, device) for j in range(U)])
            sp = [src[j].data_ptr() for j in rot]
            dp = [peer_u8[j].data_ptr() + me * n for j in rot]
            for name, variant in FLAT_VARIANTS.items():
                def call(variant=variant, sp=sp, dp=dp, n=n, src=src):
                    flat.flat_copy(variant, sp, dp, n // 16, 8 * sms,
                                   torch.cuda.current_stream().cuda_stream)
                flat_calls[(what, name)] = call
                buf.fill_(0)
                barrier()
                call()
                barrier()
                torch.cuda.synchronize()
                mine = buf.view(torch.uint8)[:U * n].view(U, n)
                ok = all(torch.equal(mine[r], flat_pattern(r, me, n, device)) for r in range(U))
                flat_ok[(what, name)] = all_true(ok, device)

    correct = {
        ("push", "v1"): check(push, "v1", lambda: (got_q, got_kv), (want_q, want_kv)),
        ("push", "v2"): check(push, "v2", lambda: (got_q, got_kv), (want_q, want_kv)),
        ("push_out", "v1"): check(push_out, "v1", lambda: (got_out,), (want_out,)),
        ("push_out", "v2"): check(push_out, "v2", lambda: (got_out,), (want_out,)),
        ("push_out", "v3"): check(push_out_blocks, "v3", lambda: (got_flat,), (want_blocks,)),
        ("push_out", "v2_contig_src"): check(push_out_contig, "v2", lambda: (got_out,),
                                             (want_out,)),
        ("out_copy", "clone"): check(push_out, "v2", lambda: (), (), out_clone),
        ("out_copy", "unpack"): check(push_out_blocks, "v3", lambda: (), (), out_unpack),
    } | flat_ok
    del want_q, want_kv, want_blocks  # (want_out: the checks' closure keeps it)

    cands = {("push", "v1"): (push, "v1"), ("push", "v2"): (push, "v2"),
             ("push_out", "v1"): (push_out, "v1"), ("push_out", "v2"): (push_out, "v2"),
             ("push_out", "v3"): (push_out_blocks, "v3"),
             ("push_out", "v2_contig_src"): (push_out_contig, "v2"),
             ("out_copy", "clone"): (out_clone, None), ("out_copy", "unpack"): (out_unpack, None)}
    cands |= {k: (fn, None) for k, fn in flat_calls.items()}
    samples: dict[tuple, list[float]] = {k: [] for k in cands}
    for fn, env in cands.values():  # warm-up, every candidate
        timed(fn, env, warmup, barrier)
    for _ in range(rounds):
        for key, (fn, env) in cands.items():
            samples[key] += timed(fn, env, iters, barrier)
    os.environ.pop(PUSH_KERNEL_ENV, None)

    rows = []
    for (what, kernel), us_list in samples.items():
        per_rank = gather_floats(statistics.median(us_list), device)
        mins = gather_floats(min(us_list), device)
        us = max(per_rank)
        if what == "push":
            per_dest = push_bytes[me]
            remote = sum(b for j, b in enumerate(push_bytes) if j != me)
        elif what == "out_copy":  # local: the whole [B, L, H, D] output
            per_dest = n_out * es
            remote = 0
        else:
            per_dest = out_bytes
            remote = (U - 1) * out_bytes
        if kernel.startswith("flat"):
            per_dest = flat_sizes[what]
            remote = (U - 1) * per_dest
        rows.append(dict(shape=list(shape), world=U, L=L, heads=heads, op=what, kernel=kernel,
                         bytes_per_dest=per_dest, remote_bytes=remote, us=us,
                         us_per_rank=per_rank, us_min=min(mins),
                         gbps_per_dest=per_dest / us / 1e3, gbps_remote=remote / us / 1e3,
                         correct=correct[(what, kernel)], samples=len(us_list)))
    for r in rows:
        if r["kernel"] in ("v2", "v3"):
            v1 = next(x for x in rows if x["op"] == r["op"] and x["kernel"] == "v1")
            r["vs_v1"] = v1["us"] / r["us"]
        if r["op"] == "push_out" and r["kernel"] != "v2":
            v2 = next(x for x in rows if x["op"] == "push_out" and x["kernel"] == "v2")
            r["vs_v2"] = v2["us"] / r["us"]
    # the output step of usp_attention besides its barrier: push-out, then the copy out
    by = {(r["op"], r["kernel"]): r for r in rows}
    for push_k, copy_k in (("v2", "clone"), ("v3", "unpack")):
        a, b = by[("push_out", push_k)], by[("out_copy", copy_k)]
        rows.append(dict(shape=list(shape), world=U, L=L, heads=heads, op="push_out+copy",
                         kernel=f"{push_k}+{copy_k}", us=a["us"] + b["us"],
                         us_min=a["us_min"] + b["us_min"], correct=a["correct"] and b["correct"],
                         derived=True))
    rows[-1]["vs_v2"] = rows[-2]["us"] / rows[-1]["us"]
    barrier()
    torch.cuda.synchronize()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--shapes", default="all", help="'all' or indices into SHAPES, e.g. 0,2")
    p.add_argument("--no-flat", action="store_true", help="skip the flat-copy baselines")
    args = p.parse_args()
    if args.cold_l2 or args.cuda_graph:
        p.error("--cold-l2 and --cuda-graph are not supported here (each iteration is a device "
                "barrier then one kernel; the inputs, 5-250 MB a rank, exceed L2 anyway)")
    warmup, iters, rounds = iters_of(args)
    if "LOCAL_RANK" not in os.environ:
        sys.exit("bench_ulysses_push: run under torchrun (--nproc-per-node=N, N >= 2)")
    missing = native_gpu_missing("bench_ulysses_push")
    if missing:
        sys.exit(missing)
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    if world < 2:
        dist.destroy_process_group()
        sys.exit("bench_ulysses_push: needs >= 2 ranks")
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    flat = None if args.no_flat else load_flat(rank)
    rows = []
    for shape in shapes:
        if shape[1] % world:
            if rank == 0:
                print(f"shape {shape}: S not divisible by {world} ranks, skipped", flush=True)
            continue
        t0 = time.time()
        rows += bench_shape(shape, world, rank, device, group, flat, warmup, iters, rounds)
        release_symmetric_buffers()  # the next shape's buffer is another size
        torch.cuda.empty_cache()
        if rank == 0:
            print(f"shape {shape}: {time.time() - t0:.1f} s", flush=True)
    if rank == 0:
        gpu = torch.cuda.get_device_name(device)
        print(f"\n{gpu} x{world}; us = slowest rank's median; GB/s per destination and out to "
              "the peers")
        print_table(rows, ["shape", "op", "kernel", "bytes_per_dest", "us", "us_min",
                           "gbps_per_dest", "gbps_remote", "vs_v1", "vs_v2", "correct"])
    path = write_json("bench_ulysses_push", rows, args.out,
                      extra={"flat_copy": flat is not None, "warmup": warmup, "iters": iters,
                             "rounds": rounds, "timing": "device barrier, event, one kernel, "
                             "event; median per rank over rounds * iters; us = max over ranks"})
    if rank == 0:
        print(f"wrote {path}")
    bad = [r for r in rows if not r["correct"]]
    dist.barrier()
    dist.destroy_process_group()
    if bad:
        sys.exit(f"bench_ulysses_push: wrong data from {[(r['op'], r['kernel']) for r in bad]}")


if __name__ == "__main__":
    main()
