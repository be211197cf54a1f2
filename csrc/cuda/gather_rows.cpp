// Torch-aware launcher of xdit_ops::gather_rows (schema in xdit_ops/ops/gather_rows.py).
// Errors here are RuntimeErrors naming the op and the value (the typed TORCH_CHECK_INDEX/TYPE/
// VALUE variants crashed the process on the GPU machine, torch 2.11); the Python wrapper checks
// first and raises the CPU reference's types: ValueError for shapes and
// devices, TypeError for dtypes, IndexError for out-of-range host-side index entries.
#include <ATen/core/DimVector.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Scalar.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <cstring>

#include "xdit_ops/gather_rows.h"
#include "utils.h"

namespace xdit_ops {

namespace {

constexpr const char* kOp = "gather_rows";

// The fill value in the tensors' dtype, repeated over 16 bytes. The conversion is torch's
// (Scalar::to, as in fill_), so CUDA and the CPU reference write the same bits.
void encode_fill(double fill, at::ScalarType dtype, uint32_t pattern[4]) {
  unsigned char bytes[16];
  const c10::Scalar value(fill);
  auto repeat = [&](const void* elem, size_t size) {
    for (size_t off = 0; off < sizeof(bytes); off += size) std::memcpy(bytes + off, elem, size);
  };
  switch (dtype) {
    case at::kDouble: {
      const double v = value.to<double>();
      repeat(&v, sizeof(v));
      break;
    }
    case at::kFloat: {
      const float v = value.to<float>();
      repeat(&v, sizeof(v));
      break;
    }
    case at::kHalf: {
      const at::Half v = value.to<at::Half>();
      repeat(&v, sizeof(v));
      break;
    }
    case at::kBFloat16: {
      const at::BFloat16 v = value.to<at::BFloat16>();
      repeat(&v, sizeof(v));
      break;
    }
    default:
      TORCH_CHECK(false, kOp, ": unsupported dtype ", dtype,
                  " (float64, float32, float16, bfloat16 only)");
  }
  std::memcpy(pattern, bytes, sizeof(bytes));
}

// Host-side indices are checked before anything is copied; device-side ones are trusted.
template <typename IndexT>
void check_host_index(const at::Tensor& index, at::TensorList sources) {
  const IndexT* idx = index.const_data_ptr<IndexT>();
  const int64_t n = index.size(0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = idx[2 * i], r = idx[2 * i + 1];
    if (s < 0) continue;
    TORCH_CHECK(s < static_cast<int64_t>(sources.size()), kOp, ": index row ", i,
                " names source ", s, " but there are ", sources.size(), " sources");
    const int64_t h = sources[s].size(-2);
    TORCH_CHECK(r >= 0 && r < h, kOp, ": index row ", i, " reads row ", r, " of source ",
                s, ", which has ", h, " rows");
  }
}

}  // namespace

at::Tensor gather_rows_cuda(at::TensorList sources, const at::Tensor& index, double fill) {
  TORCH_CHECK(!sources.empty(), kOp, ": needs at least one source");
  TORCH_CHECK(sources.size() <= static_cast<size_t>(kGatherRowsMaxSources), kOp,
              ": at most ", kGatherRowsMaxSources, " sources, got ", sources.size());
  const at::Tensor& s0 = sources[0];
  TORCH_CHECK(s0.dim() >= 2, kOp, ": sources must be [..., h, W], got ", s0.sizes());
  TORCH_CHECK(s0.is_cuda(), kOp, ": source 0 is on ", s0.device(), ", not a CUDA device");
  const at::IntArrayRef lead = s0.sizes().slice(0, s0.dim() - 2);
  const int64_t width = s0.size(-1);
  for (size_t k = 0; k < sources.size(); ++k) {
    const at::Tensor& s = sources[k];
    TORCH_CHECK(s.device() == s0.device(), kOp, ": source ", k, " is on ", s.device(),
                ", source 0 on ", s0.device());
    TORCH_CHECK(s.scalar_type() == s0.scalar_type(), kOp, ": source ", k, " is ",
                s.scalar_type(), ", source 0 is ", s0.scalar_type());
    TORCH_CHECK(
        s.dim() == s0.dim() && s.sizes().slice(0, s.dim() - 2) == lead && s.size(-1) == width,
        kOp, ": source ", k, " ", s.sizes(), " does not match source 0 ", s0.sizes(),
        " outside dim -2");
  }
  TORCH_CHECK(index.dim() == 2 && index.size(1) == 2, kOp, ": index must be [n, 2], got ",
              index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, kOp,
              ": index must be int32 or int64, got ", index.scalar_type());
  TORCH_CHECK(index.is_cpu() || index.device() == s0.device(), kOp, ": index is on ",
              index.device(), ", sources on ", s0.device());

  GatherRowsParams p{};
  encode_fill(fill, s0.scalar_type(), p.fill_pattern);
  const c10::cuda::CUDAGuard guard(s0.device());

  at::Tensor idx = index.contiguous();
  if (idx.is_cpu()) {
    if (idx.scalar_type() == at::kLong) {
      check_host_index<int64_t>(idx, sources);
    } else {
      check_host_index<int32_t>(idx, sources);
    }
    idx = idx.to(s0.device());
  }
  const int64_t n = idx.size(0);
  at::DimVector out_shape(lead.begin(), lead.end());
  out_shape.push_back(n);
  out_shape.push_back(width);
  at::Tensor out = at::empty(out_shape, s0.options());
  if (out.numel() == 0) return out;

  int64_t outer = 1;
  for (const int64_t d : lead) outer *= d;
  const int64_t elem = s0.element_size();
  // [outer, h, W] views: no copy for bands and their narrow() views along dim -2; a source whose
  // leading dims cannot be flattened, or whose rows are not contiguous, is copied first.
  c10::SmallVector<at::Tensor, kGatherRowsMaxSources> views;
  for (size_t k = 0; k < sources.size(); ++k) {
    at::Tensor v = sources[k].reshape({outer, sources[k].size(-2), width});
    if (width > 1 && v.stride(2) != 1) v = v.contiguous();
    p.src[k] = v.const_data_ptr();
    p.src_outer_stride[k] = applied_stride(v, 0) * elem;
    p.src_row_stride[k] = applied_stride(v, 1) * elem;
    // Held until the launch is queued; after that the caching allocator hands a copy's memory
    // only to later work on this stream.
    views.push_back(std::move(v));
  }
  p.num_sources = static_cast<int>(sources.size());
  p.index = idx.const_data_ptr();
  p.index_is_int64 = idx.scalar_type() == at::kLong;
  p.out = out.data_ptr();
  p.outer = outer;
  p.num_rows = n;
  p.row_bytes = width * elem;
  XDIT_CUDA_CHECK(gather_rows(p, num_sms(s0.get_device()),
                              c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

TORCH_LIBRARY_IMPL(xdit_ops, CUDA, m) { m.impl("gather_rows", &gather_rows_cuda); }

}  // namespace xdit_ops
