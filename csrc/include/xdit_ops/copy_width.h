// Copy-unit selection shared by the pure-copy kernels (gather_rows, ulysses_pack); host code,
// torch-free.
//
// A copy can move vectors of w bytes only when w divides every byte address, byte stride and
// byte length it applies. OR-ing those quantities keeps the lowest set bit of any of them, so
// the widest usable unit is the largest power of two up to 16 dividing the OR.
#pragma once

#include <vector_types.h>

#include <cstdint>
#include <initializer_list>

namespace xdit_ops {

// Widest copy unit (16, 8, 4, 2 or 1 bytes) dividing `bits` (16 when bits is 0).
constexpr int copy_width(uint64_t bits) {
  for (int w = 16; w > 1; w >>= 1) {
    if ((bits & static_cast<uint64_t>(w - 1)) == 0) return w;
  }
  return 1;
}

// The same over a list of byte quantities (addresses, strides, lengths).
constexpr int copy_width(std::initializer_list<uint64_t> byte_quantities) {
  uint64_t bits = 0;
  for (uint64_t q : byte_quantities) bits |= q;
  return copy_width(bits);
}

// Calls f(V{}) with V the unsigned type of `width` bytes (uint4, uint2, uint32_t, uint16_t,
// uint8_t; any other width takes uint8_t) and returns its result: one place that maps a width
// from copy_width onto the kernel instantiation.
template <typename F>
auto dispatch_copy_width(int width, F&& f) {
  switch (width) {
    case 16:
      return f(uint4{});
    case 8:
      return f(uint2{});
    case 4:
      return f(uint32_t{});
    case 2:
      return f(uint16_t{});
    default:
      return f(uint8_t{});
  }
}

}  // namespace xdit_ops
