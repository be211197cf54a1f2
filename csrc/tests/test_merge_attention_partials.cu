// Standalone unit test of the N-way merge kernels (no torch): merge_attention_partials against a
// host loop in double precision, with MergeImpl::kAuto (the vector kernel where head_dim and the
// addresses allow 16-byte accesses) and MergeImpl::kScalar, which must also agree bit for bit.
// Cases: every input/output dtype pair, N = 1..16, head dims with and without whole 16-byte
// chunks, partials placed one element past an aligned address (the scalar fallback), masked
// partials holding NaN, rows no partial has a key for, and a grid smaller than the work.
// Exit code: see test_common.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "test_common.h"
#include "xdit_ops/merge_attention_states.h"

namespace {

using xdit_ops::DType;
using xdit_ops::MergeImpl;
using xdit_test::DTypeOf;
using xdit_test::from_f;
using xdit_test::to_d;
using xdit_test::to_device;
using xdit_test::to_host;

// |kernel - double reference| allowed for a result rounded to TOut (values of order 1).
template <typename T>
double tolerance();
template <>
double tolerance<float>() { return 2e-5; }
template <>
double tolerance<__half>() { return 2e-3; }
template <>
double tolerance<__nv_bfloat16>() { return 1.6e-2; }

struct Result {
  std::vector<unsigned char> out;  // raw bytes, for the bit comparison of the two kernels
  std::vector<float> lse;
};

template <typename TIn, typename TOut>
Result launch(const std::vector<std::vector<TIn>>& parts,
              const std::vector<std::vector<float>>& lses, int64_t B, int64_t S, int64_t H,
              int64_t D, size_t offset, MergeImpl impl, int num_sms) {
  const int n = static_cast<int>(parts.size());
  xdit_ops::MergeAttentionPartialsParams p{};
  std::vector<void*> allocs;
  for (int i = 0; i < n; ++i) {
    void* alloc = nullptr;
    p.parts[i] = to_device(parts[i], offset, &alloc);
    allocs.push_back(alloc);
    p.part_lse[i] = to_device(lses[i]);
    allocs.push_back(const_cast<float*>(p.part_lse[i]));
  }
  const size_t numel = static_cast<size_t>(B * S * H * D);
  // Poisoned outputs: every element and LSE must be written.
  std::vector<TOut> out_init(numel, from_f<TOut>(NAN));
  std::vector<float> lse_init(static_cast<size_t>(B * H * S), NAN);
  TOut* d_out = to_device(out_init);
  float* d_lse = to_device(lse_init);
  p.num_parts = n;
  p.out = d_out;
  p.lse = d_lse;
  p.batch = B;
  p.seq = S;
  p.heads = H;
  p.head_dim = D;
  CHECK_CUDA(xdit_ops::merge_attention_partials(p, DTypeOf<TIn>::kValue, DTypeOf<TOut>::kValue,
                                                impl, num_sms, nullptr));
  const std::vector<TOut> out = to_host(d_out, numel);
  Result r;
  r.out.resize(numel * sizeof(TOut));
  std::memcpy(r.out.data(), out.data(), r.out.size());
  r.lse = to_host(d_lse, lse_init.size());
  CHECK_CUDA(cudaFree(d_out));
  CHECK_CUDA(cudaFree(d_lse));
  for (void* a : allocs) CHECK_CUDA(cudaFree(a));
  return r;
}

template <typename TIn, typename TOut>
int run_case(int64_t B, int64_t S, int64_t H, int64_t D, int n, size_t offset, int num_sms) {
  std::mt19937 rng(99 + B * 7 + S * 13 + H * 17 + D * 19 + n * 23 + offset);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t rows = B * S * H;
  std::vector<std::vector<TIn>> parts(n, std::vector<TIn>(rows * D));
  std::vector<std::vector<float>> lses(n, std::vector<float>(B * H * S));
  for (int i = 0; i < n; ++i) {
    for (auto& x : parts[i]) x = from_f<TIn>(normal(rng));
    for (auto& x : lses[i]) x = 4.f * normal(rng);
  }
  // Partial i has no keys (lse -inf, NaN data) in the rows s = i (mod n + 1); no partial has a
  // key in row s = 1.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h)
        for (int i = 0; i < n; ++i) {
          if (s % (n + 1) != i && s != 1) continue;
          lses[i][(b * H + h) * S + s] = -INFINITY;
          for (int64_t d = 0; d < D; ++d) {
            parts[i][((b * S + s) * H + h) * D + d] = from_f<TIn>(NAN);
          }
        }

  // Host reference in double.
  std::vector<double> ref(rows * D, 0.0), ref_lse(B * H * S, -INFINITY);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t li = (b * H + h) * S + s, row = (b * S + s) * H + h;
        double m = -INFINITY;
        for (int i = 0; i < n; ++i) m = std::max(m, static_cast<double>(lses[i][li]));
        if (m == -INFINITY) continue;
        double total = 0.0;
        for (int i = 0; i < n; ++i) {
          if (lses[i][li] == -INFINITY) continue;
          const double w = std::exp(lses[i][li] - m);
          total += w;
          for (int64_t d = 0; d < D; ++d) ref[row * D + d] += w * to_d<TIn>(parts[i][row * D + d]);
        }
        for (int64_t d = 0; d < D; ++d) ref[row * D + d] /= total;
        ref_lse[li] = m + std::log(total);
      }

  const Result vec = launch<TIn, TOut>(parts, lses, B, S, H, D, offset, MergeImpl::kAuto, num_sms);
  const Result scl =
      launch<TIn, TOut>(parts, lses, B, S, H, D, offset, MergeImpl::kScalar, num_sms);
  int64_t bad = 0;
  double worst = 0.0;
  const double tol = tolerance<TOut>();
  std::vector<TOut> out(rows * D);
  std::memcpy(out.data(), vec.out.data(), vec.out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    const double err = std::fabs(to_d<TOut>(out[i]) - ref[i]);
    if (!(err <= tol + tol * std::fabs(ref[i]))) ++bad;  // also catches NaN
    if (err > worst) worst = err;
  }
  for (size_t i = 0; i < ref_lse.size(); ++i) {
    const bool ok = ref_lse[i] == -INFINITY
                        ? vec.lse[i] == -INFINITY
                        : std::fabs(vec.lse[i] - ref_lse[i]) <= 1e-4 + 1e-5 * std::fabs(ref_lse[i]);
    if (!ok) ++bad;
  }
  const bool same_bits = vec.out == scl.out &&
                         std::memcmp(vec.lse.data(), scl.lse.data(),
                                     vec.lse.size() * sizeof(float)) == 0;
  if (!same_bits) ++bad;
  std::printf("in %zu B, out %zu B, N=%2d B=%lld S=%lld H=%lld D=%lld offset %zu: max |err| %.3g, "
              "%s, %lld mismatches -> %s\n",
              sizeof(TIn), sizeof(TOut), n, (long long)B, (long long)S, (long long)H,
              (long long)D, offset, worst, same_bits ? "auto == scalar" : "auto != scalar",
              (long long)bad, bad ? "FAIL" : "ok");
  return bad ? 1 : 0;
}

template <typename TIn>
int run_out_dtypes(int64_t B, int64_t S, int64_t H, int64_t D, int n, size_t offset,
                   int num_sms) {
  return run_case<TIn, float>(B, S, H, D, n, offset, num_sms) +
         run_case<TIn, __half>(B, S, H, D, n, offset, num_sms) +
         run_case<TIn, __nv_bfloat16>(B, S, H, D, n, offset, num_sms);
}

}  // namespace

int main() {
  const int num_sms = xdit_test::device_sm_count("test_merge_attention_partials");
  if (num_sms == 0) return xdit_test::kSkipped;
  int failures = 0;
  // Head dims with whole 16-byte chunks in every dtype (64, 72, 128), in 2-byte dtypes only
  // (36 x fp32 = 144 bytes; 36 x bf16 = 72 bytes: scalar) and in none (1).
  const int64_t shapes[][4] = {{3, 77, 5, 64}, {2, 41, 3, 72}, {1, 33, 4, 128}, {3, 19, 2, 36},
                               {2, 9, 3, 1}};
  for (const auto& s : shapes) {
    failures += run_out_dtypes<float>(s[0], s[1], s[2], s[3], 3, 0, num_sms);
    failures += run_out_dtypes<__half>(s[0], s[1], s[2], s[3], 3, 0, num_sms);
    failures += run_out_dtypes<__nv_bfloat16>(s[0], s[1], s[2], s[3], 3, 0, num_sms);
  }
  for (int n = 1; n <= xdit_ops::kMaxPartials; ++n) {
    failures += run_case<__nv_bfloat16, __nv_bfloat16>(2, 37, 3, 128, n, 0, num_sms);
  }
  // One element past an aligned address: no 16-byte accesses, the scalar kernel.
  failures += run_out_dtypes<__nv_bfloat16>(3, 29, 5, 128, 4, 1, num_sms);
  failures += run_out_dtypes<float>(3, 29, 5, 128, 4, 1, num_sms);
  // A grid smaller than the work: the grid-stride loops must cover the rest.
  failures += run_case<__nv_bfloat16, __nv_bfloat16>(2, 300, 7, 128, 4, 0, 1);
  failures += run_case<__nv_bfloat16, float>(2, 300, 7, 80, 5, 0, 1);
  return xdit_test::finish("test_merge_attention_partials", failures);
}
