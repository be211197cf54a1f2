// Pieces shared by the standalone kernel tests (no torch): the CUDA error check, the skip when
// no GPU is visible, host <-> device copies, element conversions and the final verdict.
// Exit code of every test: 0 pass, 1 mismatch or CUDA error, 77 no GPU (ctest reports a skip).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "xdit_ops/common.h"

// Exits with 1 on a CUDA error, naming the call and where it was made.
#define CHECK_CUDA(expr)                                                        \
  do {                                                                          \
    const cudaError_t err_ = (expr);                                            \
    if (err_ != cudaSuccess) {                                                  \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorString(err_));                                   \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)

namespace xdit_test {

constexpr int kSkipped = 77;  // ctest's SKIP_RETURN_CODE (CMakeLists.txt), gpu_check.sh's skip

// Multiprocessor count of device 0, or 0 when no CUDA device is visible (the test is then
// reported as skipped and main returns kSkipped).
inline int device_sm_count(const char* test) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("%s: no CUDA device, skipped\n", test);
    return 0;
  }
  int num_sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, 0));
  return num_sms;
}

// Device copy of `h` placed `offset` elements past a fresh (256-byte aligned) allocation. The
// allocation to free is the returned pointer minus offset; it is also stored in *alloc if given.
template <typename T>
T* to_device(const std::vector<T>& h, size_t offset = 0, void** alloc = nullptr) {
  void* base = nullptr;
  CHECK_CUDA(cudaMalloc(&base, (h.size() + offset) * sizeof(T)));
  if (alloc != nullptr) *alloc = base;
  T* d = static_cast<T*>(base) + offset;
  CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// Waits for the device, then copies n elements at `d` back.
template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// Host conversions of the element types: float -> T (round to nearest) and T -> double.
template <typename T>
T from_f(float x);
template <>
inline float from_f<float>(float x) { return x; }
template <>
inline __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
inline __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
double to_d(T x);
template <>
inline double to_d<float>(float x) { return x; }
template <>
inline double to_d<__half>(__half x) { return __half2float(x); }
template <>
inline double to_d<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// The xdit_ops::DType of an element type.
template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> { static constexpr xdit_ops::DType kValue = xdit_ops::DType::kFloat32; };
template <>
struct DTypeOf<__half> { static constexpr xdit_ops::DType kValue = xdit_ops::DType::kFloat16; };
template <>
struct DTypeOf<__nv_bfloat16> {
  static constexpr xdit_ops::DType kValue = xdit_ops::DType::kBFloat16;
};

// Prints the verdict; returns main's exit code (0 or 1).
inline int finish(const char* test, int failures) {
  if (failures) {
    std::printf("%s: %d failure(s)\n", test, failures);
    return 1;
  }
  std::printf("%s: all passed\n", test);
  return 0;
}

}  // namespace xdit_test
