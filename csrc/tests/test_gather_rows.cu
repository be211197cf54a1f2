// Standalone unit test of the row gather (no torch): the kernel against a host loop, byte for
// byte, over every access width (16, 8, 4, 2, 1 bytes), strided sources (row and outer strides
// wider than the row, a start offset), fill rows, int32 and int64 indices, and a one-SM grid.
// Exit code: see test_common.h.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "test_common.h"
#include "xdit_ops/gather_rows.h"

namespace {

using xdit_ops::GatherRowsParams;
using xdit_ops::gather_rows;
using xdit_ops::gather_rows_vector_bytes;
using xdit_test::to_device;
using xdit_test::to_host;

struct Case {
  const char* name;
  int64_t outer, row_bytes, num_rows;
  int num_sources;
  int64_t pad_row, pad_outer, offset;  // extra bytes per row, per outer step, before the start
  int elem_bytes;                      // fill element size
  bool int64_index;
  int num_sms;
};

template <typename IndexT>
std::vector<IndexT> make_index(const Case& c, const std::vector<int64_t>& heights,
                               std::mt19937& rng) {
  std::vector<IndexT> idx(2 * c.num_rows);
  for (int64_t i = 0; i < c.num_rows; ++i) {
    const int s = static_cast<int>(rng() % (c.num_sources + 1)) - 1;  // -1: a fill row
    idx[2 * i] = static_cast<IndexT>(s);
    idx[2 * i + 1] = static_cast<IndexT>(s < 0 ? 12345 : rng() % heights[s]);
  }
  return idx;
}

int run_case(const Case& c) {
  std::mt19937 rng(static_cast<unsigned>(c.row_bytes * 131 + c.num_rows));
  GatherRowsParams p{};
  std::vector<std::vector<unsigned char>> host(c.num_sources);
  std::vector<unsigned char*> dev(c.num_sources);
  std::vector<int64_t> heights(c.num_sources), row_stride(c.num_sources),
      outer_stride(c.num_sources);
  for (int s = 0; s < c.num_sources; ++s) {
    heights[s] = 1 + static_cast<int64_t>(rng() % 9);
    row_stride[s] = c.row_bytes + c.pad_row;
    outer_stride[s] = heights[s] * row_stride[s] + c.pad_outer;
    host[s].resize(c.offset + c.outer * outer_stride[s]);
    for (auto& b : host[s]) b = static_cast<unsigned char>(rng());
    dev[s] = to_device(host[s]);
    p.src[s] = dev[s] + c.offset;
    p.src_outer_stride[s] = c.outer > 1 ? outer_stride[s] : 0;
    p.src_row_stride[s] = heights[s] > 1 ? row_stride[s] : 0;
  }
  std::vector<int32_t> idx32;
  std::vector<int64_t> idx64;
  void* idx_dev;
  if (c.int64_index) {
    idx64 = make_index<int64_t>(c, heights, rng);
    idx_dev = to_device(idx64);
  } else {
    idx32 = make_index<int32_t>(c, heights, rng);
    idx_dev = to_device(idx32);
  }
  const int64_t out_bytes = c.outer * c.num_rows * c.row_bytes;
  unsigned char* out = nullptr;
  CHECK_CUDA(cudaMalloc(&out, out_bytes));
  CHECK_CUDA(cudaMemset(out, 0xA5, out_bytes));  // poison: unwritten bytes show
  unsigned char fill_elem[8];
  for (int b = 0; b < c.elem_bytes; ++b) fill_elem[b] = static_cast<unsigned char>(0x10 + b);
  unsigned char pattern[16];
  for (int b = 0; b < 16; ++b) pattern[b] = fill_elem[b % c.elem_bytes];
  std::memcpy(p.fill_pattern, pattern, 16);
  p.num_sources = c.num_sources;
  p.index = idx_dev;
  p.index_is_int64 = c.int64_index;
  p.out = out;
  p.outer = c.outer;
  p.num_rows = c.num_rows;
  p.row_bytes = c.row_bytes;
  const int vec = gather_rows_vector_bytes(p);
  CHECK_CUDA(gather_rows(p, c.num_sms, nullptr));
  const std::vector<unsigned char> got = to_host(out, out_bytes);

  int64_t bad = 0;
  for (int64_t o = 0; o < c.outer; ++o) {
    for (int64_t i = 0; i < c.num_rows; ++i) {
      const int64_t s = c.int64_index ? idx64[2 * i] : idx32[2 * i];
      const int64_t r = c.int64_index ? idx64[2 * i + 1] : idx32[2 * i + 1];
      const unsigned char* g = got.data() + (o * c.num_rows + i) * c.row_bytes;
      for (int64_t b = 0; b < c.row_bytes; ++b) {
        const unsigned char want =
            s < 0 ? fill_elem[b % c.elem_bytes]
                  : host[s][c.offset + o * outer_stride[s] + r * row_stride[s] + b];
        bad += g[b] != want;
      }
    }
  }
  std::printf("%-22s vec %2d B: %s (%lld bad bytes)\n", c.name, vec, bad ? "FAIL" : "ok",
              static_cast<long long>(bad));
  for (auto* d : dev) CHECK_CUDA(cudaFree(d));
  CHECK_CUDA(cudaFree(idx_dev));
  CHECK_CUDA(cudaFree(out));
  return bad ? 1 : 0;
}

}  // namespace

int main() {
  const int num_sms = xdit_test::device_sm_count("test_gather_rows");
  if (num_sms == 0) return xdit_test::kSkipped;
  const Case cases[] = {
      // name, outer, row bytes, rows, sources, pad row/outer, offset, elem, int64, sms
      {"aligned16", 96, 8192, 7, 3, 0, 0, 0, 2, false, num_sms},
      {"aligned16/strided", 40, 2048, 5, 2, 32, 64, 16, 4, true, num_sms},
      {"aligned8/offset", 33, 1024, 9, 3, 8, 0, 8, 2, false, num_sms},
      {"odd_bf16_w37", 17, 74, 11, 2, 0, 0, 0, 2, true, num_sms},
      {"fp32_w37", 17, 148, 11, 2, 0, 0, 0, 4, false, num_sms},
      {"bytes", 5, 13, 6, 1, 3, 1, 1, 1, false, num_sms},
      {"long_rows", 1, 1 << 20, 3, 2, 0, 0, 0, 8, false, num_sms},
      {"many_short_rows", 4096, 16, 300, 3, 0, 0, 0, 4, true, num_sms},
      {"one_sm_grid_stride", 2048, 8, 700, 2, 0, 0, 0, 8, false, 1},
  };
  int failures = 0;
  for (const Case& c : cases) failures += run_case(c);
  return xdit_test::finish("test_gather_rows", failures);
}
