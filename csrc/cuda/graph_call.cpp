// Torch-aware launcher for xdit_ops::graph_call (schema in xdit_ops/ops/usp_graph_call.py): one
// eager usp_attention call replayed from its own CUDA graph in one host call. It copies the
// call's inputs into the graph's static inputs, launches the instantiated graph on the current
// stream and returns fresh copies of the graph's outputs: what the Python replay did with
// _foreach_copy_, CUDAGraph.replay() (a Python method with hooks) and clone(), at about a tenth
// of the host time. Contiguous sources, and rows of whole heads at a uniform pitch (a view of a
// fused QKV projection), are moved with cudaMemcpyAsync / cudaMemcpy2DAsync; anything else, and
// a host source (joint_lengths), with Tensor::copy_.
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "utils.h"

namespace xdit_ops {

namespace {

// The rows of `t` (all dimensions but the last two, flattened) as (rows, row_bytes, pitch) when
// each row's last two dimensions are contiguous and the rows sit at one pitch; rows == 0 when not.
struct Rows {
  int64_t rows = 0, row_bytes = 0, pitch = 0;
};

Rows uniform_rows(const at::Tensor& t) {
  Rows r;
  const int64_t nd = t.dim();
  if (nd < 2 || t.numel() == 0) return r;
  const int64_t h = t.size(nd - 2), d = t.size(nd - 1);
  if ((d > 1 && t.stride(nd - 1) != 1) || (h > 1 && t.stride(nd - 2) != d)) return r;
  // the outer dimensions must flatten to one stride (the row pitch)
  int64_t pitch = -1, expect = -1;
  for (int64_t i = nd - 3; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (pitch < 0) {
      pitch = t.stride(i);
      expect = pitch * t.size(i);
    } else {
      if (t.stride(i) != expect) return r;
      expect *= t.size(i);
    }
  }
  const int64_t elem = t.element_size();
  r.rows = t.numel() / (h * d);
  r.row_bytes = h * d * elem;
  r.pitch = (pitch < 0 ? h * d : pitch) * elem;
  return r;
}

void copy_into(const at::Tensor& dst, const at::Tensor& src, cudaStream_t stream, size_t i) {
  constexpr const char* kOp = "graph_call";
  XDIT_CHECK(dst.sizes() == src.sizes() && dst.scalar_type() == src.scalar_type(), kOp,
             ": input ", i, " has shape ", src.sizes(), " and dtype ", src.scalar_type(),
             "; the graph was captured for ", dst.sizes(), " ", dst.scalar_type());
  const size_t bytes = static_cast<size_t>(dst.nbytes());
  if (bytes == 0) return;
  if (src.is_cuda() && src.device() == dst.device() && dst.is_contiguous()) {
    if (src.is_contiguous()) {
      XDIT_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), bytes,
                                      cudaMemcpyDeviceToDevice, stream));
      return;
    }
    const Rows r = uniform_rows(src);
    if (r.rows > 0) {
      XDIT_CUDA_CHECK(cudaMemcpy2DAsync(dst.data_ptr(), static_cast<size_t>(r.row_bytes),
                                        src.data_ptr(), static_cast<size_t>(r.pitch),
                                        static_cast<size_t>(r.row_bytes),
                                        static_cast<size_t>(r.rows), cudaMemcpyDeviceToDevice,
                                        stream));
      return;
    }
  }
  dst.copy_(src);  // the general case (strided, or a host source), on the current stream
}

}  // namespace

// statics[i] <- srcs[i]; launch `graph_exec` (a cudaGraphExec_t as an integer) on the current
// stream of statics[0]'s device; return a copy of every tensor of `outs`. Returns an empty list
// (and does nothing) while the current stream is being captured: the caller then runs the call
// itself, so an outer capture records its kernels rather than a launch of this graph.
std::vector<at::Tensor> graph_call_cuda(at::TensorList statics, at::TensorList srcs,
                                        at::TensorList outs, int64_t graph_exec) {
  constexpr const char* kOp = "graph_call";
  XDIT_CHECK(!statics.empty() && statics.size() == srcs.size(), kOp, ": ", statics.size(),
             " static inputs for ", srcs.size(), " inputs");
  XDIT_CHECK(graph_exec != 0, kOp, ": no instantiated graph (graph_exec 0)");
  const at::Tensor& anchor = statics[0];
  XDIT_CHECK(anchor.is_cuda(), kOp, ": the static inputs must be CUDA tensors, got ",
             anchor.device());
  const c10::cuda::CUDAGuard guard(anchor.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  XDIT_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status != cudaStreamCaptureStatusNone) return {};
  for (size_t i = 0; i < statics.size(); ++i) copy_into(statics[i], srcs[i], stream, i);
  XDIT_CUDA_CHECK(cudaGraphLaunch(
      reinterpret_cast<cudaGraphExec_t>(static_cast<intptr_t>(graph_exec)), stream));
  std::vector<at::Tensor> result;
  result.reserve(outs.size());
  for (const at::Tensor& o : outs) {
    at::Tensor c = at::empty(o.sizes(), o.options());
    if (o.numel() > 0) {
      if (o.is_contiguous()) {
        XDIT_CUDA_CHECK(cudaMemcpyAsync(c.data_ptr(), o.data_ptr(),
                                        static_cast<size_t>(o.nbytes()),
                                        cudaMemcpyDeviceToDevice, stream));
      } else {
        c.copy_(o);
      }
    }
    result.push_back(std::move(c));
  }
  return result;
}

TORCH_LIBRARY_IMPL(xdit_ops, CUDA, m) { m.impl("graph_call", &graph_call_cuda); }

}  // namespace xdit_ops
