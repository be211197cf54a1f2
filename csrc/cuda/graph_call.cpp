// Torch-aware launcher for xdit_ops::graph_call (schema in xdit_ops/ops/usp_graph_call.py): one
// eager usp_attention call replayed from its own CUDA graph in one host call. It copies the
// call's inputs into the graph's static inputs, launches the instantiated graph on the current
// stream and returns fresh copies of the graph's outputs: what the Python replay did with
// _foreach_copy_, CUDAGraph.replay() (a Python method with hooks) and clone(). Contiguous
// sources, and rows of whole heads at a uniform pitch (a view of a fused QKV projection), are
// copied by one row-copy kernel launch (xdit_ops/row_copy.h) before the graph and one after it
// for the outputs; anything else, and a host source (joint_lengths), with Tensor::copy_.
// Arguments are checked on the Python side (a failing C++ check segfaults the GPU machines'
// processes, runs 7, 31 and 51); the checks here are the backstop.
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "utils.h"
#include "xdit_ops/row_copy.h"

namespace xdit_ops {

namespace {

// The rows of `t` (all dimensions but the last two, flattened) as (rows, row_bytes, pitch) when
// each row's last two dimensions are contiguous and the rows sit at one pitch; rows == 0 when not.
struct Rows {
  int64_t rows = 0, row_bytes = 0, pitch = 0;
};

void flush(RowCopyParams& batch, cudaStream_t stream);

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

// Adds "dst <- src" to `batch` when the row copy can do it (src on dst's device, contiguous or
// rows of whole heads at one pitch, dst contiguous); launches `batch` first when it is full.
// Returns false when it cannot: the caller copies with Tensor::copy_.
bool add_copy(RowCopyParams& batch, const at::Tensor& dst, const at::Tensor& src,
              cudaStream_t stream) {
  if (!src.is_cuda() || src.device() != dst.device() || !dst.is_contiguous()) return false;
  RowCopySegment seg{dst.data_ptr(), src.data_ptr(), 1, static_cast<int64_t>(src.nbytes()), 0, 0};
  if (!src.is_contiguous()) {
    const Rows r = uniform_rows(src);
    if (r.rows == 0) return false;
    seg = {dst.data_ptr(), src.data_ptr(), r.rows, r.row_bytes, r.row_bytes, r.pitch};
  }
  if (seg.rows * seg.row_bytes == 0) return true;
  if (batch.num_segments == kRowCopyMaxSegments) flush(batch, stream);
  batch.seg[batch.num_segments++] = seg;
  return true;
}

void flush(RowCopyParams& batch, cudaStream_t stream) {
  if (batch.num_segments == 0) return;
  XDIT_CUDA_CHECK(launch_row_copy(batch, stream));
  batch.num_segments = 0;
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
  RowCopyParams batch{};
  for (size_t i = 0; i < statics.size(); ++i) {
    // (the Python side checked shapes and dtypes: graph_call() or the fast path's key)
    XDIT_CHECK(statics[i].sizes() == srcs[i].sizes() &&
                   statics[i].scalar_type() == srcs[i].scalar_type(),
               kOp, ": input ", i, " has shape ", srcs[i].sizes(), " and dtype ",
               srcs[i].scalar_type(), "; the graph was captured for ", statics[i].sizes());
    if (!add_copy(batch, statics[i], srcs[i], stream)) statics[i].copy_(srcs[i]);
  }
  flush(batch, stream);
  XDIT_CUDA_CHECK(cudaGraphLaunch(
      reinterpret_cast<cudaGraphExec_t>(static_cast<intptr_t>(graph_exec)), stream));
  std::vector<at::Tensor> result;
  result.reserve(outs.size());
  for (const at::Tensor& o : outs) {
    at::Tensor c = at::empty(o.sizes(), o.options());
    if (!add_copy(batch, c, o, stream)) c.copy_(o);
    result.push_back(std::move(c));
  }
  flush(batch, stream);
  return result;
}

TORCH_LIBRARY_IMPL(xdit_ops, CUDA, m) { m.impl("graph_call", &graph_call_cuda); }

}  // namespace xdit_ops
