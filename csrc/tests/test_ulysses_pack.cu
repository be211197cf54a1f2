// Standalone unit test of the Ulysses pack / unpack / place kernels (no torch): each kernel
// against a host loop written from the layout definitions in ulysses_pack.h, for 1-, 2- and
// 4-byte elements, q/k/v as strided views of a fused [B, L, 3, H, D] buffer, uneven heads,
// joint rows in front and behind, and base pointers off 16-byte alignment (narrower copy unit).
// The kernels only copy, so every comparison is exact.
// Exit code: see test_common.h.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "test_common.h"
#include "xdit_ops/ulysses_pack.h"

namespace {

using xdit_test::to_device;
using xdit_test::to_host;

int g_failures = 0;
int g_num_sms = 0;

template <typename T>
std::vector<T> random_vec(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(gen());
  return v;
}

template <typename T>
void expect_equal(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[i] != want[i]) {
      std::fprintf(stderr, "FAIL %s: element %zu differs\n", what, i);
      ++g_failures;
      return;
    }
  }
}

std::vector<int> starts_of(const std::vector<int>& heads) {
  std::vector<int> s(heads.size() + 1, 0);
  for (size_t j = 0; j < heads.size(); ++j) s[j + 1] = s[j] + heads[j];
  return s;
}

// num_ranks and head_start of pack's or unpack's params from the starts (starts_of).
template <typename Params>
void set_head_starts(Params& p, const std::vector<int>& st) {
  p.num_ranks = static_cast<int>(st.size()) - 1;
  for (size_t j = 0; j < st.size(); ++j) p.head_start[j] = st[j];
}

// q, k, v as strided views of a fused [B, rows, 3, H, D] buffer (view t starts t * H * D in).
template <typename T>
void fused_qkv_views(const T* fused, int64_t rows, int64_t H, int64_t D, const void* src[3],
                     int64_t stride_b[3], int64_t stride_s[3], int64_t stride_h[3]) {
  for (int t = 0; t < 3; ++t) {
    src[t] = fused + t * H * D;
    stride_b[t] = rows * 3 * H * D;
    stride_s[t] = 3 * H * D;
    stride_h[t] = D;
  }
}

template <typename T>
void test_pack(int64_t B, int64_t L, int64_t D, const std::vector<int>& heads, size_t offset) {
  const std::vector<int> st = starts_of(heads);
  const int64_t H = st.back();
  const auto fused = random_vec<T>(B * L * 3 * H * D, 17);  // [B, L, 3, H, D]
  void* a_in;
  void* a_out;
  const T* d_in = to_device(fused, offset, &a_in);
  CHECK_CUDA(cudaMalloc(&a_out, 3 * B * L * H * D * sizeof(T)));
  CHECK_CUDA(cudaMemset(a_out, 0xFF, 3 * B * L * H * D * sizeof(T)));
  xdit_ops::UlyssesPackParams p{};
  fused_qkv_views(d_in, L, H, D, p.src, p.src_stride_b, p.src_stride_s, p.src_stride_h);
  p.out = a_out;
  p.batch = B;
  p.seq = L;
  p.heads = H;
  p.head_dim = D;
  set_head_starts(p, st);
  CHECK_CUDA(xdit_ops::ulysses_pack_qkv(p, sizeof(T), g_num_sms, nullptr));
  std::vector<T> want(3 * B * L * H * D);
  for (size_t j = 0; j < heads.size(); ++j) {
    const int64_t hj = heads[j], off = 3 * B * L * D * st[j];
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t l = 0; l < L; ++l)
          for (int64_t g = 0; g < hj; ++g)
            for (int64_t d = 0; d < D; ++d)
              want[off + (((t * B + b) * L + l) * hj + g) * D + d] =
                  fused[(((b * L + l) * 3 + t) * H + st[j] + g) * D + d];
  }
  expect_equal(to_host(static_cast<const T*>(a_out), want.size()), want, "pack");
  CHECK_CUDA(cudaFree(a_in));
  CHECK_CUDA(cudaFree(a_out));
}

template <typename T>
void test_unpack(int64_t B, int64_t J, int64_t L, int64_t D, const std::vector<int>& heads,
                 bool joint_front, size_t offset) {
  const std::vector<int> st = starts_of(heads);
  const int64_t H = st.back(), R = J + L;
  const auto recv = random_vec<T>(B * R * H * D, 29);
  void* a_in;
  void* a_out;
  const T* d_in = to_device(recv, offset, &a_in);
  CHECK_CUDA(cudaMalloc(&a_out, B * R * H * D * sizeof(T)));
  CHECK_CUDA(cudaMemset(a_out, 0xFF, B * R * H * D * sizeof(T)));
  xdit_ops::UlyssesUnpackParams p{};
  p.recv = d_in;
  p.out = a_out;
  p.batch = B;
  p.joint = J;
  p.seq = L;
  p.heads = H;
  p.head_dim = D;
  p.joint_front = joint_front;
  set_head_starts(p, st);
  CHECK_CUDA(xdit_ops::ulysses_unpack_out(p, sizeof(T), g_num_sms, nullptr));
  std::vector<T> want(B * R * H * D);
  for (size_t j = 0; j < heads.size(); ++j) {
    const int64_t hj = heads[j], off = B * R * D * st[j];
    for (int64_t b = 0; b < B; ++b)
      for (int64_t rr = 0; rr < R; ++rr) {  // received row: J joint rows, then L rows
        const int64_t r = joint_front ? rr : (rr < J ? L + rr : rr - J);
        for (int64_t g = 0; g < hj; ++g)
          for (int64_t d = 0; d < D; ++d)
            want[((b * R + r) * H + st[j] + g) * D + d] =
                recv[off + ((b * R + rr) * hj + g) * D + d];
      }
  }
  expect_equal(to_host(static_cast<const T*>(a_out), want.size()), want, "unpack");
  CHECK_CUDA(cudaFree(a_in));
  CHECK_CUDA(cudaFree(a_out));
}

template <typename T>
void test_place(int64_t U, int64_t B, int64_t L, int64_t h, int64_t H, int64_t D, int64_t J,
                bool joint_kv, int64_t head_start, size_t offset) {
  const int64_t Jk = joint_kv ? J : 0, G = U * L;
  const auto recv = random_vec<T>(U * 3 * B * L * h * D, 41);
  const auto fused = random_vec<T>(B * J * 3 * H * D + 1, 43);  // joint [B, J, 3, H, D]
  void* a_recv;
  void* a_joint;
  void* a_q;
  void* a_kv;
  const T* d_recv = to_device(recv, 0, &a_recv);
  const T* d_joint = to_device(fused, offset, &a_joint);
  CHECK_CUDA(cudaMalloc(&a_q, B * (J + G) * h * D * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&a_kv, 2 * B * (Jk + G) * h * D * sizeof(T)));
  // Poisoned like pack's and unpack's outputs, so an element the kernel skips shows.
  CHECK_CUDA(cudaMemset(a_q, 0xFF, B * (J + G) * h * D * sizeof(T)));
  CHECK_CUDA(cudaMemset(a_kv, 0xFF, 2 * B * (Jk + G) * h * D * sizeof(T)));
  xdit_ops::UlyssesPlaceParams p{};
  p.recv = d_recv;
  fused_qkv_views(d_joint, J, H, D, p.joint_src, p.joint_stride_b, p.joint_stride_s,
                  p.joint_stride_h);
  p.joint_head_start = head_start;
  p.qbuf = a_q;
  p.kv = a_kv;
  p.ranks = U;
  p.batch = B;
  p.seq = L;
  p.heads = h;
  p.head_dim = D;
  p.joint = J;
  p.joint_kv = Jk;
  CHECK_CUDA(xdit_ops::ulysses_place_gathered(p, sizeof(T), g_num_sms, nullptr));
  auto source = [&](int64_t t, int64_t b, int64_t r, int64_t jrows, int64_t g, int64_t d) {
    if (r < jrows) return fused[(((b * J + r) * 3 + t) * H + head_start + g) * D + d];
    const int64_t u = (r - jrows) / L, l = (r - jrows) % L;
    return recv[((((u * 3 + t) * B + b) * L + l) * h + g) * D + d];
  };
  std::vector<T> want_q(B * (J + G) * h * D), want_kv(2 * B * (Jk + G) * h * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < h; ++g)
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t r = 0; r < J + G; ++r)
          want_q[((b * (J + G) + r) * h + g) * D + d] = source(0, b, r, J, g, d);
        for (int64_t t = 1; t < 3; ++t)
          for (int64_t r = 0; r < Jk + G; ++r)
            want_kv[((((t - 1) * B + b) * (Jk + G) + r) * h + g) * D + d] =
                source(t, b, r, Jk, g, d);
      }
  expect_equal(to_host(static_cast<const T*>(a_q), want_q.size()), want_q, "place q");
  expect_equal(to_host(static_cast<const T*>(a_kv), want_kv.size()), want_kv, "place kv");
  for (void* a : {a_recv, a_joint, a_q, a_kv}) CHECK_CUDA(cudaFree(a));
}

template <typename T>
void run_all(size_t misalign) {
  const std::vector<int> even = {6, 6, 6, 6}, uneven = {8, 8, 7, 7};
  for (int64_t D : {128, 72, 36, 1}) {
    for (size_t off : {size_t{0}, misalign}) {
      test_pack<T>(3, 77, D, uneven, off);
      test_pack<T>(1, 130, D, even, off);
      for (bool front : {true, false}) {
        test_unpack<T>(2, 77, 65, D, uneven, front, off);
        test_unpack<T>(1, 0, 130, D, even, front, off);
      }
      for (bool joint_kv : {true, false}) {
        test_place<T>(4, 2, 33, 7, 30, D, 77, joint_kv, 16, off);
        test_place<T>(2, 1, 40, 12, 24, D, 0, joint_kv, 12, off);
      }
    }
  }
}

}  // namespace

int main() {
  g_num_sms = xdit_test::device_sm_count("test_ulysses_pack");
  if (g_num_sms == 0) return xdit_test::kSkipped;
  run_all<uint8_t>(1);
  run_all<uint16_t>(1);
  run_all<uint32_t>(2);
  return xdit_test::finish("test_ulysses_pack", g_failures);
}
