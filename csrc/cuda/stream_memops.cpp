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

}  // namespace

// The driver takes at most this many operations in one cuStreamBatchMemOp.
constexpr size_t kMaxBatch = 256;

// program: (kind, address, value) triples, run in order on the current stream of anchor's device. kind 0: the
// stream waits until the 32-bit word at address equals value; kind 1: value is written to it,
// after a memory fence (so every earlier write of this stream, copies included, is visible to
// whoever sees the value).
// With `batched`, the triples go to the driver as cuStreamBatchMemOp calls of up to kMaxBatch
// operations (one stream operation each, in order), else one call per triple.
void stream_memops_cuda(const at::Tensor& anchor, at::IntArrayRef program, bool batched) {
  constexpr const char* kOp = "stream_memops";
  XDIT_CHECK(anchor.is_cuda(), kOp, ": anchor must be a CUDA tensor, got ", anchor.device());
  const c10::cuda::CUDAGuard guard(anchor.device());
  XDIT_CHECK(program.size() % 3 == 0, kOp, ": the program must be (kind, address, value) "
             "triples, got ", program.size(), " integers");
  const MemOps& ops = memops();
  XDIT_CHECK(ops.wait != nullptr && ops.write != nullptr, kOp,
             ": the driver has no cuStreamWaitValue32/cuStreamWriteValue32");
  const CUstream stream = c10::cuda::getCurrentCUDAStream().stream();
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
  for (size_t i = 0; i < program.size(); i += 3) {
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

// `anchor` (any tensor on the device, e.g. the flag buffer) picks the kernel and the device whose
// current stream the operations go on.
TORCH_LIBRARY_IMPL(xdit_ops, CUDA, m) {
  m.impl("stream_memops", &stream_memops_cuda);
  m.impl("copy2d", &copy2d_cuda);
}

}  // namespace xdit_ops
