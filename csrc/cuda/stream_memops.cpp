// Torch-aware launchers for xdit_ops::stream_memops and xdit_ops::copy2d (schemas in
// xdit_ops/ops/stream_memops.py): stream-ordered flag waits and writes (cuStreamWaitValue32 /
// cuStreamWriteValue32) and 2-D copies on the copy engines (cudaMemcpy2DAsync), on the current
// stream. Neither takes a multiprocessor: a flag wait queued behind a full-GPU kernel on another
// stream does not wait for a free SM, as a signalling kernel would. Addresses are raw device
// addresses (peer-mapped ones included); the Python side derives them from tensors it keeps
// alive, and checks them, since a failing check here would take the process down on some
// machines (benchmarks/results/2026-11-26-run31).
#include <cstdint>
#include <cstring>
#include <mutex>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/ArrayRef.h>
#include <cuda.h>
#include <torch/library.h>

#include "utils.h"

namespace xdit_ops {

namespace {

using WaitFn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using WriteFn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using BatchFn = CUresult (*)(CUstream, unsigned int, CUstreamBatchMemOpParams*, unsigned int);

// The driver's stream memory operations, looked up once through the runtime (no link against
// libcuda, so the module still imports on a machine without a driver).
struct MemOps {
  WaitFn wait = nullptr;
  WriteFn write = nullptr;
  BatchFn batch = nullptr;
};

const MemOps& memops() {
  static MemOps ops;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &fn, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess) {
      ops.wait = reinterpret_cast<WaitFn>(fn);
    }
    fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", &fn, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess) {
      ops.write = reinterpret_cast<WriteFn>(fn);
    }
    fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuStreamBatchMemOp", &fn, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess) {
      ops.batch = reinterpret_cast<BatchFn>(fn);
    }
  });
  return ops;
}

// The driver takes at most this many operations in one cuStreamBatchMemOp.
constexpr size_t kMaxBatch = 256;

// The stream the operations go on: `stream` is a cudaStream_t of anchor's device as an integer
// (what torch.cuda.Stream.cuda_stream gives), or -1 for the device's current stream. The tensor
// ops take it so that a caller queuing on a side stream need not make it current (a Python
// stream context per call costs microseconds of host time).
cudaStream_t pick_stream(int64_t stream) {
  return stream == -1 ? c10::cuda::getCurrentCUDAStream().stream()
                      : reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream));
}

// program: n (kind, address, value) triples, run in order on `stream`. kind 0: the stream waits
// until the 32-bit word at address equals value; kind 1: value is written to it, after a memory
// fence (so every earlier write of this stream, copies included, is visible to whoever sees the
// value).
// With `batched`, the triples go to the driver as cuStreamBatchMemOp calls of up to kMaxBatch
// operations (one stream operation each, in order), else one call per triple.
void run_memops(const char* kOp, cudaStream_t cu_stream, const int64_t* program, size_t size,
                bool batched) {
  XDIT_CHECK(size % 3 == 0, kOp, ": the program must be (kind, address, value) "
             "triples, got ", size, " integers");
  const MemOps& ops = memops();
  XDIT_CHECK(ops.wait != nullptr && ops.write != nullptr, kOp,
             ": the driver has no cuStreamWaitValue32/cuStreamWriteValue32");
  const auto stream = static_cast<CUstream>(cu_stream);
  CUstreamBatchMemOpParams batch[kMaxBatch];
  size_t n = 0;
  auto flush = [&] {
    if (n == 0) return;
    const CUresult r = ops.batch(stream, static_cast<unsigned int>(n), batch, 0);
    XDIT_CHECK(r == CUDA_SUCCESS, kOp, ": a batch of ", n, " operations failed with CUresult ",
               static_cast<int>(r));
    n = 0;
  };
  batched = batched && ops.batch != nullptr;
  for (size_t i = 0; i < size; i += 3) {
    const int64_t kind = program[i];
    const auto addr = static_cast<CUdeviceptr>(program[i + 1]);
    const auto value = static_cast<cuuint32_t>(program[i + 2]);
    XDIT_CHECK((kind == 0 || kind == 1) && addr != 0 && addr % 4 == 0, kOp, ": step ", i / 3,
               " (kind ", kind, ", address ", program[i + 1], ") is not a wait (0) or write (1) "
               "of an aligned word");
    if (batched) {
      CUstreamBatchMemOpParams& op = batch[n++];
      std::memset(&op, 0, sizeof(op));
      if (kind == 0) {
        op.waitValue.operation = CU_STREAM_MEM_OP_WAIT_VALUE_32;
        op.waitValue.address = addr;
        op.waitValue.value = value;
        op.waitValue.flags = CU_STREAM_WAIT_VALUE_EQ;
      } else {
        op.writeValue.operation = CU_STREAM_MEM_OP_WRITE_VALUE_32;
        op.writeValue.address = addr;
        op.writeValue.value = value;
        op.writeValue.flags = CU_STREAM_WRITE_VALUE_DEFAULT;
      }
      if (n == kMaxBatch) flush();
      continue;
    }
    const CUresult r = kind == 0 ? ops.wait(stream, addr, value, CU_STREAM_WAIT_VALUE_EQ)
                                 : ops.write(stream, addr, value, CU_STREAM_WRITE_VALUE_DEFAULT);
    XDIT_CHECK(r == CUDA_SUCCESS, kOp, ": step ", i / 3, " (kind ", kind, ") failed with CUresult ",
               static_cast<int>(r));
  }
  flush();
}

// A 1-D CPU int64 tensor's data (the tensor ops' programs and descriptors). The Python side
// makes these once per plan and checks them there; this check is the cheap backstop.
const int64_t* host_words(const at::Tensor& t, const char* op, const char* name) {
  XDIT_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 &&
                 t.is_contiguous(),
             op, ": ", name, " must be a contiguous 1-D CPU int64 tensor, got ", t.scalar_type(),
             " of shape ", t.sizes(), " on ", t.device());
  return t.data_ptr<int64_t>();
}

// descs: (dst, dst_pitch, src, src_pitch, width, height) sextuples in bytes, with source i
// rebased to bases[which[i]] + descs[6 i + 2] when `which` is given (a per-plan template whose
// sources are offsets from this call's tensors). `copy(desc)` moves one descriptor.
template <typename Copy>
void for_each_copy2d(const char* kOp, const int64_t* descs, size_t size, const int64_t* which,
                     size_t n_which, c10::IntArrayRef bases, Copy copy) {
  XDIT_CHECK(size % 6 == 0, kOp, ": descs must be (dst, dst_pitch, src, src_pitch, "
             "width, height) sextuples, got ", size, " integers");
  XDIT_CHECK(which == nullptr || n_which == size / 6, kOp, ": ", n_which,
             " source indices for ", size / 6, " descriptors");
  for (size_t i = 0; i < size; i += 6) {
    int64_t d[6] = {descs[i], descs[i + 1], descs[i + 2], descs[i + 3], descs[i + 4],
                    descs[i + 5]};
    if (which != nullptr) {
      const int64_t w = which[i / 6];
      XDIT_CHECK(w >= 0 && static_cast<size_t>(w) < bases.size(), kOp, ": descriptor ", i / 6,
                 " names source ", w, " of ", bases.size());
      d[2] += bases[w];
    }
    if (d[4] == 0 || d[5] == 0) continue;
    XDIT_CHECK(d[0] > 0 && d[2] > 0 && d[1] >= 0 && d[3] >= 0 && d[4] > 0 && d[5] > 0 &&
                   (d[5] == 1 || (d[4] <= d[1] && d[4] <= d[3])),
               kOp, ": descriptor ", i / 6, " (dst ", d[0], ", src ", d[2], ", width ", d[4],
               ", height ", d[5], ") is not a valid 2-D copy");
    copy(d);
  }
}

}  // namespace

void stream_memops_cuda(const at::Tensor& anchor, at::IntArrayRef program, bool batched) {
  constexpr const char* kOp = "stream_memops";
  XDIT_CHECK(anchor.is_cuda(), kOp, ": anchor must be a CUDA tensor, got ", anchor.device());
  const c10::cuda::CUDAGuard guard(anchor.device());
  run_memops(kOp, c10::cuda::getCurrentCUDAStream().stream(), program.data(), program.size(),
             batched);
}

// The same with the program as a CPU int64 tensor (made once per plan: no list of Python ints
// to convert per call), on `stream` (see pick_stream).
void stream_memops_t_cuda(const at::Tensor& anchor, const at::Tensor& program, bool batched,
                          int64_t stream) {
  constexpr const char* kOp = "stream_memops_t";
  XDIT_CHECK(anchor.is_cuda(), kOp, ": anchor must be a CUDA tensor, got ", anchor.device());
  const int64_t* words = host_words(program, kOp, "program");
  const c10::cuda::CUDAGuard guard(anchor.device());
  run_memops(kOp, pick_stream(stream), words, static_cast<size_t>(program.numel()), batched);
}

// descs: (dst, dst_pitch, src, src_pitch, width, height) in bytes, one cudaMemcpy2DAsync each
// on the current stream of anchor's device (cudaMemcpyDefault: either side may be a peer's mapped memory).
void copy2d_cuda(const at::Tensor& anchor, at::IntArrayRef descs) {
  constexpr const char* kOp = "copy2d";
  XDIT_CHECK(anchor.is_cuda(), kOp, ": anchor must be a CUDA tensor, got ", anchor.device());
  const c10::cuda::CUDAGuard guard(anchor.device());
  XDIT_CHECK(descs.size() % 6 == 0, kOp, ": descs must be (dst, dst_pitch, src, src_pitch, "
             "width, height) sextuples, got ", descs.size(), " integers");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (size_t i = 0; i < descs.size(); i += 6) {
    if (descs[i + 4] == 0 || descs[i + 5] == 0) continue;
    XDIT_CUDA_CHECK(cudaMemcpy2DAsync(
        reinterpret_cast<void*>(descs[i]), static_cast<size_t>(descs[i + 1]),
        reinterpret_cast<const void*>(descs[i + 2]), static_cast<size_t>(descs[i + 3]),
        static_cast<size_t>(descs[i + 4]), static_cast<size_t>(descs[i + 5]), cudaMemcpyDefault,
        stream));
  }
}

// copy2d with the descriptors as a CPU int64 tensor (a per-plan template), sources rebased here
// (`which` empty: the descriptors are absolute; else descriptor i's source is
// bases[which[i]] + its offset), on `stream` (see pick_stream). A one-row descriptor is one
// cudaMemcpyAsync (what torch's copy_ of a contiguous block queues).
void copy2d_t_cuda(const at::Tensor& anchor, const at::Tensor& descs, const at::Tensor& which,
                   at::IntArrayRef bases, int64_t stream) {
  constexpr const char* kOp = "copy2d_t";
  XDIT_CHECK(anchor.is_cuda(), kOp, ": anchor must be a CUDA tensor, got ", anchor.device());
  const int64_t* d = host_words(descs, kOp, "descs");
  const int64_t* w = which.numel() ? host_words(which, kOp, "which") : nullptr;
  const c10::cuda::CUDAGuard guard(anchor.device());
  const cudaStream_t s = pick_stream(stream);
  for_each_copy2d(kOp, d, static_cast<size_t>(descs.numel()), w,
                  static_cast<size_t>(which.numel()), bases, [&](const int64_t* c) {
    void* dst = reinterpret_cast<void*>(c[0]);
    const void* src = reinterpret_cast<const void*>(c[2]);
    if (c[5] == 1) {
      XDIT_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(c[4]), cudaMemcpyDefault, s));
    } else {
      XDIT_CUDA_CHECK(cudaMemcpy2DAsync(dst, static_cast<size_t>(c[1]), src,
                                        static_cast<size_t>(c[3]), static_cast<size_t>(c[4]),
                                        static_cast<size_t>(c[5]), cudaMemcpyDefault, s));
    }
  });
}

// The same on host memory (anchor a CPU tensor; stream must be -1): the rebase and the checks
// above, with each row a memcpy. The CPU tests run the template arithmetic through it.
void copy2d_t_cpu(const at::Tensor& anchor, const at::Tensor& descs, const at::Tensor& which,
                  at::IntArrayRef bases, int64_t stream) {
  constexpr const char* kOp = "copy2d_t";
  XDIT_CHECK(anchor.device().is_cpu() && stream == -1, kOp,
             ": on the CPU the anchor must be a CPU tensor and stream -1, got ", anchor.device(),
             " and ", stream);
  const int64_t* d = host_words(descs, kOp, "descs");
  const int64_t* w = which.numel() ? host_words(which, kOp, "which") : nullptr;
  for_each_copy2d(kOp, d, static_cast<size_t>(descs.numel()), w,
                  static_cast<size_t>(which.numel()), bases, [&](const int64_t* c) {
    for (int64_t row = 0; row < c[5]; ++row) {
      std::memmove(reinterpret_cast<char*>(c[0]) + row * c[1],
                   reinterpret_cast<const char*>(c[2]) + row * c[3], static_cast<size_t>(c[4]));
    }
  });
}

// `anchor` (any tensor on the device, e.g. the flag buffer) picks the kernel and the device whose
// current stream the operations go on.
TORCH_LIBRARY_IMPL(xdit_ops, CUDA, m) {
  m.impl("stream_memops", &stream_memops_cuda);
  m.impl("copy2d", &copy2d_cuda);
  m.impl("stream_memops_t", &stream_memops_t_cuda);
  m.impl("copy2d_t", &copy2d_t_cuda);
}

TORCH_LIBRARY_IMPL(xdit_ops, CPU, m) { m.impl("copy2d_t", &copy2d_t_cpu); }

}  // namespace xdit_ops
