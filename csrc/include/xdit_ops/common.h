// Types shared by kernels and launchers; host-compilable (no device code).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace xdit_ops {

// Element types crossing the torch-free boundary. The launchers map torch dtypes onto these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace xdit_ops
