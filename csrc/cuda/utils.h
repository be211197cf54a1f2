// Small helpers shared by the torch-aware launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "xdit_ops/common.h"

// Errors name the op and the offending value (house style); TORCH_CHECK raises RuntimeError.
#define XDIT_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)

#define XDIT_CUDA_CHECK(expr)                                                          \
  do {                                                                                 \
    const cudaError_t xdit_err_ = (expr);                                              \
    TORCH_CHECK(xdit_err_ == cudaSuccess, #expr, " failed: ", cudaGetErrorString(xdit_err_)); \
  } while (0)

namespace xdit_ops {

inline DType to_dtype(c10::ScalarType t, const char* op) {
  switch (t) {
    case c10::ScalarType::Float:
      return DType::kFloat32;
    case c10::ScalarType::Half:
      return DType::kFloat16;
    case c10::ScalarType::BFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t, " (float32, float16, bfloat16 only)");
  }
}

// Stride of dimension d for a copy unit's alignment test: 0 when the dimension has at most one
// index. Such a stride is never applied, and an odd value there (views made by unsqueeze or
// slicing) would only force a narrower copy unit.
inline int64_t applied_stride(const at::Tensor& t, int64_t d) {
  return t.size(d) > 1 ? t.stride(d) : 0;
}

// Multiprocessor count, cached per device: querying attributes on every call costs microseconds.
inline int num_sms(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    XDIT_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

}  // namespace xdit_ops
