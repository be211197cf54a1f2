// sm_90a FP8 attention kernel (torch-free): wgmma (IGMMA s8 for Q K^T, QGMMA e4m3 for P.V).
//
// One warpgroup (128 threads) per CTA owns 64 query rows of one (batch, head) and walks the
// keys in 64-key tiles. All operands are in shared memory in the GMMA K-major swizzled layouts
// (CuTe's ss_smem_selector); P goes through shared memory as e4m3 (an SS product, so no
// register permutation to the FP8 A-operand layout is needed). K and V^T tiles are
// double-buffered with cp.async (tile t + 1 in flight while tile t computes); Q is loaded once.
// TMA, a producer warp and softmax/GEMM overlap: the warp-specialised fp8_attention_sm90_ws.cuh.
//
// Numerics: identical to xdit_ops/triton/kernels/fp8_attention.py (see that file and the
// reference); the GPU test compares both with the CPU emulation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "xdit_ops/fp8_attention_sm90.h"
#include "xdit_ops/fp8_attention_sm90_common.cuh"

namespace xdit_ops {
namespace fp8_sm90 {

using namespace cute;
using fp8_sm90_common::int_to_float_exact;
using fp8_sm90_common::kPShift;
using fp8_sm90_common::MmaPVSel;
using fp8_sm90_common::quad_max;
using fp8_sm90_common::quad_sum;
using fp8_sm90_common::store_lse;

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;  // must equal the reference SCHEME.block_n
constexpr int kThreads = 128;

template <int kDP>
struct SmemLayouts {
  using Q = decltype(tile_to_shape(
      GMMA::Layout_K_SW64_Atom<int8_t>{}, Shape<Int<kBlockM>, Int<kDP>>{}));
  using K = decltype(tile_to_shape(
      GMMA::Layout_K_SW64_Atom<int8_t>{}, Shape<Int<kBlockN>, Int<kDP>>{}));
  using Vt = decltype(tile_to_shape(
      GMMA::Layout_K_SW64_Atom<cutlass::float_e4m3_t>{}, Shape<Int<kDP>, Int<kBlockN>>{}));
  using P = decltype(tile_to_shape(
      GMMA::Layout_K_SW64_Atom<cutlass::float_e4m3_t>{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
};

// Swizzled GMMA operands start on 1 KB boundaries (the swizzle pattern's repeat), so the
// hardware's address-based swizzle and CuTe's agree with a zero descriptor base offset.
template <int kDP>
struct alignas(1024) SharedStorage {
  alignas(1024) int8_t q[kBlockM * kDP];
  alignas(1024) int8_t k[2][kBlockN * kDP];  // double-buffered: tile t+1 loads during tile t
  alignas(1024) cutlass::float_e4m3_t vt[2][kDP * kBlockN];
  alignas(1024) cutlass::float_e4m3_t p[kBlockM * kBlockN];
};

template <int kDP>
using MmaQK = decltype(make_tiled_mma(SM90::GMMA::MMA_64x64x32_S32S8S8_SS_TN{}));

// Copies a [rows, cols] tile of bytes from global (row stride ld, 16-byte aligned rows) into a
// swizzled shared tensor with 16-byte vectors; rows >= valid_rows are zero-filled. The swizzle
// permutes 16-byte chunks only, so each vector stays contiguous.
template <int kRows, int kCols, class SmemTensor>
__device__ __forceinline__ void load_tile(SmemTensor& s, const uint8_t* g, int64_t ld,
                                          int valid_rows) {
  constexpr int kVecPerRow = kCols / 16;
  for (int i = threadIdx.x; i < kRows * kVecPerRow; i += kThreads) {
    const int r = i / kVecPerRow;
    const int c = (i % kVecPerRow) * 16;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < valid_rows) v = *reinterpret_cast<const uint4*>(g + r * ld + c);
    *reinterpret_cast<uint4*>(raw_pointer_cast(&s(r, c))) = v;
  }
}

// The same tile copy with cp.async (16 bytes, L2 only), every row valid; completes at the
// matching cp.async.wait_group. Its writes reach wgmma (async proxy) only after
// fence.proxy.async in each writing thread and a barrier.
template <int kRows, int kCols, class SmemTensor>
__device__ __forceinline__ void load_tile_async(SmemTensor& s, const uint8_t* g, int64_t ld) {
  constexpr int kVecPerRow = kCols / 16;
  for (int i = threadIdx.x; i < kRows * kVecPerRow; i += kThreads) {
    const int r = i / kVecPerRow;
    const int c = (i % kVecPerRow) * 16;
    const uint32_t dst =
        static_cast<uint32_t>(__cvta_generic_to_shared(raw_pointer_cast(&s(r, c))));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(g + r * ld + c));
  }
  asm volatile("cp.async.commit_group;\n" ::);
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

template <class TiledMma, class FragA, class FragB, class FragC>
__device__ __forceinline__ void gemm_zero_init(TiledMma& mma, FragA const& a, FragB const& b,
                                               FragC& c) {
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
}

template <int kDP, typename OutT>
__global__ void __launch_bounds__(kThreads, 1)
    fp8_attention_kernel(const Fp8AttentionSm90Params p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<kDP>*>(smem_raw);
  using L = SmemLayouts<kDP>;
  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename L::Q{});
  Tensor sK0 = make_tensor(make_smem_ptr(smem.k[0]), typename L::K{});
  Tensor sK1 = make_tensor(make_smem_ptr(smem.k[1]), typename L::K{});
  Tensor sVt0 = make_tensor(make_smem_ptr(smem.vt[0]), typename L::Vt{});
  Tensor sVt1 = make_tensor(make_smem_ptr(smem.vt[1]), typename L::Vt{});
  Tensor sP = make_tensor(make_smem_ptr(smem.p), typename L::P{});

  const int m0 = blockIdx.x * kBlockM;
  const int64_t bh = blockIdx.y;
  const int b = static_cast<int>(bh / p.heads);
  const int h = static_cast<int>(bh % p.heads);
  const int tid = threadIdx.x;

  load_tile<kBlockM, kDP>(sQ, reinterpret_cast<const uint8_t*>(p.q8) + (bh * p.seq_q + m0) * kDP,
                          kDP, p.seq_q - m0);

  MmaQK<kDP> mma_qk;
  typename MmaPVSel<kDP>::type mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
  Tensor tSrK0 = thr_qk.partition_fragment_B(sK0);
  Tensor tSrK1 = thr_qk.partition_fragment_B(sK1);
  Tensor tOrP = thr_pv.partition_fragment_A(sP);
  Tensor tOrV0 = thr_pv.partition_fragment_B(sVt0);
  Tensor tOrV1 = thr_pv.partition_fragment_B(sVt1);
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tOrPV = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kDP>>{});
  Tensor tOrO = make_fragment_like(tOrPV);
  clear(tOrO);
  // (row, col) of every accumulator element this thread holds.
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kDP>>{}));

  // Each thread's accumulator elements cover two rows, r0 and r0 + 8 (the wgmma C layout);
  // the four threads of a quad share them.
  const int r0 = get<0>(tScS(0));
  float q_scale[2], m_i[2], l_i[2];
  CUTE_UNROLL
  for (int j = 0; j < 2; ++j) {
    const int row = m0 + r0 + 8 * j;
    q_scale[j] = row < p.seq_q ? p.q_scale[bh * p.seq_q + row] : 0.f;
    m_i[j] = -INFINITY;
    l_i[j] = 0.f;
  }

  const uint8_t* k_base = reinterpret_cast<const uint8_t*>(p.k8) + bh * p.seq_k_pad * kDP;
  const uint8_t* vt_base = p.vt8 + bh * kDP * p.seq_k_pad;
  const float* ks_base = p.k_scale + bh * p.seq_k_pad;

  // Tile 0 into buffer 0; tile t + 1 is copied into the other buffer while tile t computes.
  if (p.seq_k > 0) {
    load_tile_async<kBlockN, kDP>(sK0, k_base, kDP);
    load_tile_async<kDP, kBlockN>(sVt0, vt_base, p.seq_k_pad);
  }
  for (int n0 = 0, t = 0; n0 < p.seq_k; n0 += kBlockN, ++t) {
    // Every warp finished tile t - 1's wgmmas (which read the other buffer and sP).
    __syncthreads();
    const bool odd = t & 1;
    if (n0 + kBlockN < p.seq_k) {
      const int64_t n1 = n0 + kBlockN;
      if (odd) {
        load_tile_async<kBlockN, kDP>(sK0, k_base + n1 * kDP, kDP);
        load_tile_async<kDP, kBlockN>(sVt0, vt_base + n1, p.seq_k_pad);
      } else {
        load_tile_async<kBlockN, kDP>(sK1, k_base + n1 * kDP, kDP);
        load_tile_async<kDP, kBlockN>(sVt1, vt_base + n1, p.seq_k_pad);
      }
      cp_async_wait<2>();  // this tile's two groups have landed; the next tile's may not
    } else {
      cp_async_wait<0>();
    }
    // Generic-proxy writes that the async proxy (wgmma) reads next need this fence.
    cutlass::arch::fence_view_async_shared();
    __syncthreads();

    if (odd) {
      gemm_zero_init(mma_qk, tSrQ, tSrK1, tSrS);
    } else {
      gemm_zero_init(mma_qk, tSrQ, tSrK0, tSrS);
    }

    float s[size(tSrS)];
    float tile_max[2] = {-INFINITY, -INFINITY};
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int row_j = (get<0>(tScS(i)) - r0) >> 3;
      const int col = n0 + get<1>(tScS(i));
      float v = int_to_float_exact(tSrS(i)) * ks_base[col];
      v = v * q_scale[row_j];
      if (col >= p.seq_k) v = -INFINITY;
      s[i] = v;
      tile_max[row_j] = fmaxf(tile_max[row_j], v);
    }
    float alpha[2], m_shift[2], tile_sum[2] = {0.f, 0.f};
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const float m_new = fmaxf(m_i[j], quad_max(tile_max[j]));
      alpha[j] = exp2f(m_i[j] - m_new);
      m_shift[j] = m_new - kPShift;
      m_i[j] = m_new;
    }
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int row_j = (get<0>(tScS(i)) - r0) >> 3;
      const float pv = exp2f(s[i] - m_shift[row_j]);
      tile_sum[row_j] += pv;
      sP(get<0>(tScS(i)), get<1>(tScS(i))) = cutlass::float_e4m3_t(pv);
    }
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) l_i[j] = l_i[j] * alpha[j] + quad_sum(tile_sum[j]);
    cutlass::arch::fence_view_async_shared();
    __syncthreads();

    if (odd) {
      gemm_zero_init(mma_pv, tOrP, tOrV1, tOrPV);
    } else {
      gemm_zero_init(mma_pv, tOrP, tOrV0, tOrPV);
    }
    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) {
      const int row_j = (get<0>(tOcO(i)) - r0) >> 3;
      tOrO(i) = tOrO(i) * alpha[row_j] + tOrPV(i);
    }
  }

  // Epilogue: out = acc / l * v_scale, in the output dtype; LSE in natural log.
  const float* vs = p.v_scale + bh * kDP;
  OutT* out = reinterpret_cast<OutT*>(p.out);
  CUTE_UNROLL
  for (int i = 0; i < size(tOrO); ++i) {
    const int r = get<0>(tOcO(i));
    const int c = get<1>(tOcO(i));
    const int row = m0 + r;
    if (row < p.seq_q && c < p.head_dim) {
      const int row_j = (r - r0) >> 3;
      const float v = tOrO(i) / l_i[row_j] * vs[c];
      out[b * p.out_stride_b + static_cast<int64_t>(row) * p.out_stride_s +
          h * p.out_stride_h + c] = from_float<OutT>(v);
    }
  }
  if (p.lse != nullptr && (tid & 3) == 0) store_lse(p, bh, m0 + r0, m_i, l_i);
}

template <int kDP, typename OutT>
cudaError_t launch(const Fp8AttentionSm90Params& p, int batch, cudaStream_t stream) {
  const int smem = static_cast<int>(sizeof(SharedStorage<kDP>));
  auto kernel = fp8_attention_kernel<kDP, OutT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.seq_q + kBlockM - 1) / kBlockM, batch * p.heads);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fp8_sm90
}  // namespace xdit_ops
