// Warp-specialised sm_90a FP8 attention kernel (torch-free): TMA producer, two consumer
// warpgroups that take turns on the tensor cores (or three: kConsumers, at the end of this
// comment). Numerics: the reference SCHEME with 128-key tiles (block_n = 128); see
// fp8_attention_sm90_ws.h.
//
// CTA = 3 warpgroups (384 threads) for 128 query rows of one (batch, head):
//
// * warpgroup 0, the producer, gives registers back (setmaxnreg.dec to 24); one thread issues
//   TMA loads (descriptors built on the host, CuTe make_tma_copy): Q once (two 64-row boxes),
//   then K [128 keys, Dp] (with its 128 key scales, a bulk copy on the same mbarrier) and
//   V^T [Dp, 128 keys] tiles into a kStages-deep ring. Each stage has a "full" mbarrier per
//   operand (transaction bytes) and an "empty" one that the 256 consumer threads arrive on
//   when they are done with the stage (the wgmmas that read it have completed; for K, the key
//   scales are read too); K and V have their own barriers, so a K slot is refilled as soon as
//   both consumers' Q K^T used it. Keys past Sk_pad (a multiple of 64) in the last tile read
//   as zeros (TMA bounds).
// * warpgroups 1 and 2, the consumers (setmaxnreg.inc to 240), own 64 query rows each and walk
//   every key tile. Per "slot" a consumer issues Q K^T of tile t (64x128 s32 accumulators) and
//   then P.V of tile t - 1 (e4m3 P from registers, RS wgmma; fp32 accumulator from zero) as
//   two wgmma commit groups, waits for Q K^T alone and runs the softmax of tile t while P.V
//   still runs (FlashAttention-3's intra-warpgroup overlap); then it waits for P.V, puts P of
//   tile t as e4m3 into the A-operand registers and adds P.V to the fp32 output accumulator
//   (two-level accumulation). The two consumers take turns issuing (two named barriers: a
//   consumer issues after the other has issued its own), so one consumer's softmax overlaps
//   the other's GEMMs (FlashAttention-3's "ping-pong" schedule).
//
// Q, K and V^T sit in shared memory in the GMMA K-major swizzled layouts that TMA writes
// (128-byte swizzle for 128-byte rows: Q/K at Dp = 128 and V^T; 64-byte for Q/K at Dp = 64);
// Q K^T is an SS wgmma, P.V an RS one (P never leaves registers). That needs V^T's keys in the
// P.V key order (see pv_a_register; the host interface's vt8): inside every 32-key block, V^T
// column pi(k) holds key k, so that each thread's own S accumulator values land in its own
// A-operand slots. ptxas (nvcc 13.0, sm_90a): 168 registers at launch, no spills; the
// consumers' code stays within 240 registers and the producer's within 24.
//
// kTileKScale (XDIT_OPS_FP8_K_SCALE=tile; auto's choice for sm90ws): one K scale per 128-key
// tile, read once per tile and folded into the exponent's FMA (softmax_tile); the row max is
// taken on the integer bit patterns of the scores. Nothing in it depends on Dp (built for 64
// and 128). ptxas (nvcc 13.0, sm_90a): 168 registers at launch, no spills, like the per-key
// kernel; the steady key loop is 497 SASS instructions per warp per 128-key tile against the
// per-key kernel's 670 at Dp 128, 457 against 629 at Dp 64 (bf16 and fp16 output alike; no
// LDS of key scales, no per-score FADD/FMUL of the conversion and the K scale, 40 integer
// max instructions, three-input VIMNMX3 mostly, for 76 FMNMX).
//
// kConsumers = 3 (XDIT_OPS_FP8_SM90_CONSUMERS=3; per-tile K scales, Dp = 64 only): 4
// warpgroups (512 threads) for 192 query rows, as FlashAttention-3 at head dim 64, where the
// kernel is bound by the exponentials and latency rather than the GEMMs (half of Dp 128's per
// tile, the same 64 exponentials per row): one more consumer to issue while the others wait.
// The consumers issue in round robin (one named barrier each; kPingPong = false: freely) and
// hold 160 registers (setmaxnreg; the producer 24). To fit, a consumer waits for P.V of tile
// t - 1 and adds it to the output before the softmax of tile t (kPVFirst: ptxas hoists that
// wait above the exponentials in the 2-consumer kernel too), reads the tile's K scale after the
// wgmmas (kScaleLate), and takes the scheduling barrier ids as immediates. Each consumer's 64
// rows are computed with the same arithmetic as with 2 consumers: the same bits out. ptxas
// (nvcc 13.0, sm_90a): 128 registers at launch, no spills, the consumers within R0-R157; steady
// key loop 470 SASS instructions per warp per 128-key tile (457 with 2 consumers; 453 without
// the round robin). The 2-consumer kernels' SASS is unchanged by the template argument.
//
// kRowSumTC (the per-tile kernels at Dp = 64, 2 and 3 consumers): the softmax's row sums come
// from the tensor cores instead of 64 FADDs and a quad reduction per tile: each V^T stage has 8
// more rows of e4m3 ones (written once; TMA fills the first Dp rows), P.V runs with N = Dp + 8
// (CuTe's extended shapes), and its extra columns are the row sums of the e4m3 P, added to l
// with the tile's alpha like the output (the scheme's p8_row_sum: the sum of what multiplies V).
// Run 68 (H100): 480.0 against 441.7 TFLOPS at (2,4250,24,64) with 3 consumers, 369.5 against
// 366.8 with 2; at Dp = 128 847.2 against 876.4 (the wider P.V costs more than the FADDs save),
// so Dp 128 keeps the FADDs. ptxas: the 3-consumer kernel spills 28 bytes (44 reloaded) with it.
#pragma once

// The P.V atoms with N = Dp + 8 (kRowSumTC: 72 and 136) are CuTe's extended GMMA shapes.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <climits>

#include <cute/tensor.hpp>  // first: the atom headers below expect it
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "xdit_ops/fp8_attention_sm90_common.cuh"
#include "xdit_ops/fp8_attention_sm90_ws.h"

namespace xdit_ops {
namespace fp8_sm90_ws {

using namespace cute;
using cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterTransactionBarrier;
using fp8_sm90_common::int_to_float_exact;
using fp8_sm90_common::kPShift;
using fp8_sm90_common::quad_max;
using fp8_sm90_common::quad_sum;
using fp8_sm90_common::store_lse;

constexpr int kBlockM = 64;  // query rows per consumer warpgroup
constexpr int kBlockN = kFp8AttentionSm90WsBlockN;  // the scheme's block_n
constexpr int kStages = 4;
// kConsumers, a template argument: consumer warpgroups per CTA, 2 (every head dim) or 3
// (Dp = 64 only; see kConsumerRegs). A CTA computes kConsumers * 64 query rows.
template <int kConsumers>
constexpr int kThreads = 128 * (1 + kConsumers);
// 2 consumers: 24 * 128 + 240 * 256 = 64512 <= 65536 registers; launch_bounds(384, 1) gives 168
// each first. At Dp = 128 a consumer holds 3 x 64 fp32/s32 accumulators (S, P.V, O) across a
// slot's wgmmas: with 232 registers ptxas spilled, with 240 it does not.
// 3 consumers: 24 * 128 + 160 * 384 = 64512 (launch_bounds(512, 1) gives 128 each first). At
// Dp = 64 the accumulators are 64 + 32 + 32 registers; at Dp = 128 they alone would be 192.
// (setmaxnreg counts are multiples of 8.)
constexpr int kProducerRegs = 24;
template <int kConsumers>
constexpr int kConsumerRegs = kConsumers == 2 ? 240 : 160;
// Named barriers (0 is __syncthreads): 1 + w = "consumer w may issue its GEMMs" (256 threads:
// its own 128 sync, the previous consumer's 128 arrive; see consume).
constexpr int kSchedBarrier = 1;

template <int kDP, int kConsumers>
constexpr void check_consumers() {
  static_assert(kConsumers == 2 || kConsumers == 3, "2 or 3 consumer warpgroups");
  static_assert(kConsumers == 2 || kDP == 64,
                "3 consumers only at Dp = 64: at Dp = 128 the S, P.V and O accumulators alone "
                "take 192 of a consumer's 160 registers");
  static_assert(kProducerRegs * 128 + kConsumerRegs<kConsumers> * 128 * kConsumers <= 65536,
                "the register split must fit the register file");
}

static_assert(kBlockN == 128, "the V^T shared layout below assumes 128-byte rows of keys");

// P.V with P from registers: e4m3 x e4m3 -> fp32, 64 query rows by the padded head dim, A (P)
// in registers, B (V^T) in shared memory.
template <int kDP>
struct MmaPVRS;
template <>
struct MmaPVRS<64> {
  using type = decltype(make_tiled_mma(
      SM90::GMMA::MMA_64x64x32_F32E4M3E4M3_RS_TN<GMMA::ScaleIn::One, GMMA::ScaleIn::One>{}));
};
template <>
struct MmaPVRS<128> {
  using type = decltype(make_tiled_mma(
      SM90::GMMA::MMA_64x128x32_F32E4M3E4M3_RS_TN<GMMA::ScaleIn::One, GMMA::ScaleIn::One>{}));
};
// kRowSumTC: V^T with 8 more rows of e4m3 ones (N = Dp + 8): the extra columns of P.V are
// the row sums of P.
template <>
struct MmaPVRS<72> {
  using type = decltype(make_tiled_mma(
      SM90::GMMA::MMA_64x72x32_F32E4M3E4M3_RS_TN<GMMA::ScaleIn::One, GMMA::ScaleIn::One>{}));
};
template <>
struct MmaPVRS<136> {
  using type = decltype(make_tiled_mma(
      SM90::GMMA::MMA_64x136x32_F32E4M3E4M3_RS_TN<GMMA::ScaleIn::One, GMMA::ScaleIn::One>{}));
};

// The A-operand register of P (8-bit RS wgmma m64nNk32, CuTe's ALayout_64x32) and the key order
// of V^T that makes it thread-local. The S accumulator (CLayout_64xN) gives thread (warp wp,
// lane) rows g = 16 wp + lane / 4 and g + 8 (r = 0, 1) and, inside the 32-key block kb, keys
// 8 jj + 2 l + b (l = lane % 4, jj < 4, b < 2); as P, e4m3 pair r + 2 (4 kb + jj) (key b in
// byte b). The A fragment gives the same thread, per block kb, four 32-bit registers
// 4 kb + r + 2 h holding row g + 8 r, A columns 4 l + 16 h + a in byte a (a < 4). With
// pi(8 jj + 2 l + b) = 4 l + 16 (jj >> 1) + 2 (jj & 1) + b, key 8 jj + 2 l + b of the thread's
// own S goes to register 4 kb + r + 2 (jj >> 1), byte 2 (jj & 1) + b, which is A column
// pi(key): so V^T column pi(k) must hold key k (the quantization pass's P.V key order). P.V
// sums over keys; the same permutation on both sides changes only the tensor core's summation
// order inside a 32-key step. (Checked on the host with CuTe's ALayout_64x32 and
// CLayout_64x128, the fragment type below and set_p's indexing: every one of the 64 x 128 A
// slots of every thread gets the S value of its row and of key pi^-1(column).)
__device__ __forceinline__ uint32_t pv_a_register(__nv_fp8x2_storage_t lo,
                                                  __nv_fp8x2_storage_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

template <int kDP>
struct Cfg {
  using AtomQK = std::conditional_t<kDP == 128, GMMA::Layout_K_SW128_Atom<int8_t>,
                                    GMMA::Layout_K_SW64_Atom<int8_t>>;
  using AtomF8 = GMMA::Layout_K_SW128_Atom<cutlass::float_e4m3_t>;
  using SmemQ = decltype(tile_to_shape(AtomQK{}, Shape<Int<kBlockM>, Int<kDP>>{}));
  // The Q slices of kConsumers consumers (one 64-row slice each).
  template <int kConsumers>
  using SmemQAll =
      decltype(tile_to_shape(AtomQK{}, Shape<Int<kBlockM>, Int<kDP>, Int<kConsumers>>{}));
  using SmemK = decltype(tile_to_shape(AtomQK{}, Shape<Int<kBlockN>, Int<kDP>>{}));
  using SmemKAll =
      decltype(tile_to_shape(AtomQK{}, Shape<Int<kBlockN>, Int<kDP>, Int<kStages>>{}));
  using SmemVt = decltype(tile_to_shape(AtomF8{}, Shape<Int<kDP>, Int<kBlockN>>{}));
  using SmemVtAll =
      decltype(tile_to_shape(AtomF8{}, Shape<Int<kDP>, Int<kBlockN>, Int<kStages>>{}));
  // kRowSumTC: each stage holds Dp + 8 rows of 128 keys; TMA writes the first Dp (the
  // swizzle atoms are 8 rows of 128 bytes, stacked: the first Dp rows of a stage are SmemVt's
  // bytes), the last 8 hold e4m3 ones, written once.
  using SmemVtAllExt =
      decltype(tile_to_shape(AtomF8{}, Shape<Int<kDP + 8>, Int<kBlockN>, Int<kStages>>{}));
  using MmaPVExt = typename MmaPVRS<kDP + 8>::type;
  using MmaQK = decltype(make_tiled_mma(SM90::GMMA::MMA_64x128x32_S32S8S8_SS_TN{}));
  using MmaPV = typename MmaPVRS<kDP>::type;
  static constexpr uint32_t kQBytes = kBlockM * kDP;
  static constexpr uint32_t kKBytes = kBlockN * kDP;
  static constexpr uint32_t kVBytes = kDP * kBlockN;
};

// Every operand buffer starts on a 1 KB boundary (the swizzle pattern's repeat), each stage
// and each consumer's slice is a multiple of 1 KB.
// kVtExt (kRowSumTC): each V^T stage has 8 more rows (the ones).
template <int kDP, int kConsumers, bool kVtExt = false>
struct alignas(1024) Storage {
  alignas(1024) int8_t q[kConsumers * kBlockM * kDP];
  alignas(1024) int8_t k[kStages * kBlockN * kDP];
  alignas(1024) cutlass::float_e4m3_t vt[kStages * (kDP + (kVtExt ? 8 : 0)) * kBlockN];
  alignas(128) float ks[kStages][kBlockN];  // the K tile's key scales (bulk copy, with K)
  uint64_t q_full;
  uint64_t k_full[kStages];
  uint64_t v_full[kStages];
  uint64_t k_empty[kStages];
  uint64_t v_empty[kStages];
};

// TMA descriptors over the QuantizedQKV buffers, as 3-D tensors (rows, Dp or keys, batch*head)
// so that a box never reaches into the next head: rows past the end read as zeros.
template <int kDP>
auto make_tma_q(const int8_t* q8, int seq_q, int bh) {
  Tensor g = make_tensor(make_gmem_ptr(q8), make_shape(seq_q, Int<kDP>{}, bh),
                         make_stride(int64_t(kDP), _1{}, int64_t(seq_q) * kDP));
  return make_tma_copy(SM90_TMA_LOAD{}, g, typename Cfg<kDP>::SmemQ{});
}

template <int kDP>
auto make_tma_k(const int8_t* k8, int seq_k_pad, int bh) {
  Tensor g = make_tensor(make_gmem_ptr(k8), make_shape(seq_k_pad, Int<kDP>{}, bh),
                         make_stride(int64_t(kDP), _1{}, int64_t(seq_k_pad) * kDP));
  return make_tma_copy(SM90_TMA_LOAD{}, g, typename Cfg<kDP>::SmemK{});
}

template <int kDP>
auto make_tma_vt(const uint8_t* vt8, int seq_k_pad, int bh) {
  Tensor g = make_tensor(make_gmem_ptr(reinterpret_cast<const cutlass::float_e4m3_t*>(vt8)),
                         make_shape(Int<kDP>{}, seq_k_pad, bh),
                         make_stride(int64_t(seq_k_pad), _1{}, int64_t(seq_k_pad) * kDP));
  return make_tma_copy(SM90_TMA_LOAD{}, g, typename Cfg<kDP>::SmemVt{});
}

template <int kDP>
struct KernelParams {
  using TmaQ = decltype(make_tma_q<kDP>(nullptr, 1, 1));
  using TmaK = decltype(make_tma_k<kDP>(nullptr, 64, 1));
  using TmaVt = decltype(make_tma_vt<kDP>(nullptr, 64, 1));
  TmaQ tma_q;
  TmaK tma_k;
  TmaVt tma_vt;
  Fp8AttentionSm90Params p;
  int bh_count;
};

// Max over the four lanes of a quad, on integers (softmax_tile's max over score bit patterns).
__device__ __forceinline__ int quad_max_int(int x) {
  x = max(x, __shfl_xor_sync(0xffffffff, x, 1));
  return max(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The same with the barrier id and thread count as immediates (no register holds them).
template <int kId, int kThreadCount>
__device__ __forceinline__ void named_barrier_sync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kThreadCount) : "memory");
}

template <int kId, int kThreadCount>
__device__ __forceinline__ void named_barrier_arrive() {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "n"(kThreadCount) : "memory");
}

// f(Int<w>{}) for the run-time w < kCount (warp-uniform: a uniform branch per value).
template <int kCount, int kI = 0, typename F>
__device__ __forceinline__ void with_static(int w, F&& f) {
  if constexpr (kI + 1 == kCount) {
    f(Int<kI>{});
  } else if (w == kI) {
    f(Int<kI>{});
  } else {
    with_static<kCount, kI + 1>(w, f);
  }
}

// mbarrier wait with a watchdog: a wait that has not completed after about 8 x 2^31 SM cycles
// (~9 s at 1.98 GHz; a schedule or transaction-count bug: the kernel would hang) traps, so the
// launch fails with an error ("unspecified launch failure") instead of hanging the process.
// Used by the producer only: its empty-slot waits stall as soon as any consumer does, and after
// its last load it waits for the release of the last tiles, so it watches the consumers until
// their last P.V; a trap ends the whole grid. In the consumers the watchdog's state made ptxas
// spill (hundreds of bytes at Dp 128 in the key loop, 24 at the Q wait).
__device__ __forceinline__ void wait_barrier(const uint64_t* bar, uint32_t phase) {
  uint32_t start = static_cast<uint32_t>(clock());
  int periods = 0;
  while (!ClusterBarrier::try_wait(bar, phase)) {
    const uint32_t now = static_cast<uint32_t>(clock());
    if (now - start >= (1u << 31)) {
      start = now;
      if (++periods == 8) __trap();
    }
  }
}

// The stages of V^T as TMA writes them: (Dp, keys, stage), with kVtExt (kRowSumTC) the first
// Dp rows of each (Dp + 8)-row stage.
template <int kDP, bool kVtExt>
__device__ __forceinline__ auto vt_stages(cutlass::float_e4m3_t* vt) {
  using C = Cfg<kDP>;
  if constexpr (kVtExt) {
    return local_tile(make_tensor(make_smem_ptr(vt), typename C::SmemVtAllExt{}),
                      Shape<Int<kDP>, Int<kBlockN>, Int<kStages>>{}, make_coord(0, 0, 0));
  } else {
    return make_tensor(make_smem_ptr(vt), typename C::SmemVtAll{});
  }
}

// The producer: one thread issues every TMA load of the CTA. kTileKScale: the consumers read
// only the tile's first key scale (one K scale per 128-key tile), so only the first 16 bytes
// (four scales; the minimum bulk copy) of the tile's scales are copied. kVtExt: V^T's stages
// have 8 more rows (kRowSumTC).
template <int kDP, int kConsumers, bool kTileKScale, bool kVtExt>
__device__ __forceinline__ void produce(const KernelParams<kDP>& kp,
                                        Storage<kDP, kConsumers, kVtExt>& s, int n_tiles) {
  using C = Cfg<kDP>;
  const Fp8AttentionSm90Params& p = kp.p;
  const int bh = blockIdx.y;
  prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
  prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
  prefetch_tma_descriptor(kp.tma_vt.get_tma_descriptor());

  Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(p.seq_q, Int<kDP>{}, kp.bh_count));
  Tensor gQ = local_tile(mQ(_, _, bh), Shape<Int<kBlockM>, Int<kDP>>{}, make_coord(_, 0));
  Tensor sQ = make_tensor(make_smem_ptr(s.q), typename C::template SmemQAll<kConsumers>{});
  auto [tQg, tQs] = tma_partition(kp.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                  group_modes<0, 2>(gQ));
  // A consumer whose 64 rows all lie past seq_q gets no Q box: it computes on whatever its Q
  // slice holds (finite int8 codes; its q_scale is 0) and writes nothing.
  const int q_tile0 = kConsumers * blockIdx.x;
  const int q_boxes = min(kConsumers, (p.seq_q + kBlockM - 1) / kBlockM - q_tile0);
  ClusterTransactionBarrier::arrive_and_expect_tx(&s.q_full, q_boxes * C::kQBytes);
  for (int w = 0; w < q_boxes; ++w) {
    copy(kp.tma_q.with(s.q_full), tQg(_, q_tile0 + w), tQs(_, w));
  }

  Tensor mK = kp.tma_k.get_tma_tensor(make_shape(p.seq_k_pad, Int<kDP>{}, kp.bh_count));
  Tensor gK = local_tile(mK(_, _, bh), Shape<Int<kBlockN>, Int<kDP>>{}, make_coord(_, 0));
  Tensor sK = make_tensor(make_smem_ptr(s.k), typename C::SmemKAll{});
  auto [tKg, tKs] = tma_partition(kp.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                  group_modes<0, 2>(gK));
  Tensor mV = kp.tma_vt.get_tma_tensor(make_shape(Int<kDP>{}, p.seq_k_pad, kp.bh_count));
  Tensor gV = local_tile(mV(_, _, bh), Shape<Int<kDP>, Int<kBlockN>>{}, make_coord(0, _));
  Tensor sV = vt_stages<kDP, kVtExt>(s.vt);
  auto [tVg, tVs] = tma_partition(kp.tma_vt, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                  group_modes<0, 2>(gV));

  for (int t = 0; t < n_tiles; ++t) {
    const int st = t % kStages;
    // Parity of the stage's previous use; on the first pass (phase 1 of a fresh barrier) the
    // wait returns at once.
    const uint32_t empty_phase = ((t / kStages) & 1) ^ 1;
    wait_barrier(&s.k_empty[st], empty_phase);
    // The key scales of the tile ride on K's barrier; only those inside Sk_pad are read (the
    // last tile may reach past it: those keys are masked, their scales never used).
    // (Sk_pad - t kBlockN >= 64 for every tile: the 16 bytes of kTileKScale are inside.)
    const int ks_bytes =
        kTileKScale ? 16 : min(kBlockN, p.seq_k_pad - t * kBlockN) * int(sizeof(float));
    ClusterTransactionBarrier::arrive_and_expect_tx(&s.k_full[st], C::kKBytes + ks_bytes);
    copy(kp.tma_k.with(s.k_full[st]), tKg(_, t), tKs(_, st));
    SM90_BULK_COPY_G2S::copy(p.k_scale + int64_t(bh) * p.seq_k_pad + t * kBlockN, &s.k_full[st],
                             s.ks[st], ks_bytes);
    wait_barrier(&s.v_empty[st], empty_phase);
    ClusterTransactionBarrier::arrive_and_expect_tx(&s.v_full[st], C::kVBytes);
    copy(kp.tma_vt.with(s.v_full[st]), tVg(_, t), tVs(_, st));
  }
  // Stay as the watchdog until both consumers have released the last tiles (tile t's release
  // completes phase t / kStages of its stage's empty barriers).
  for (int t = max(0, n_tiles - kStages); t < n_tiles; ++t) {
    wait_barrier(&s.k_empty[t % kStages], (t / kStages) & 1);
    wait_barrier(&s.v_empty[t % kStages], (t / kStages) & 1);
  }
}

// A consumer warpgroup: 64 query rows, every key tile (see the file comment for the schedule).
// kTileKScale: the K scales are equal within a 128-key tile (the scheme with k_block = 128,
// XDIT_OPS_FP8_K_SCALE=tile); the softmax reads one scale per tile (softmax_tile).
// kRowSumTC: the softmax's row sums from the tensor cores (the e4m3 P times 8 rows of ones
// appended to V^T: P.V with N = Dp + 8): the sum of the e4m3 P (the emulation's p8_row_sum),
// added like the output, a tile late; else FADDs of the fp32 P, one chain per row.
template <int kDP, int kConsumers, typename OutT, bool kTileKScale, bool kPingPong,
          bool kRowSumTC, bool kLateRowSum = false, bool kFastEpilogue = false,
          bool kUnroll2 = false>
__device__ __forceinline__ void consume(const KernelParams<kDP>& kp,
                                        Storage<kDP, kConsumers, kRowSumTC>& s, int n_tiles,
                                        int w) {
  using C = Cfg<kDP>;
  const Fp8AttentionSm90Params& p = kp.p;
  const int tid = threadIdx.x % 128;
  const int64_t bh = blockIdx.y;
  const int m0 = (kConsumers * blockIdx.x + w) * kBlockM;

  Tensor sQ = make_tensor(make_smem_ptr(s.q), typename C::template SmemQAll<kConsumers>{});
  Tensor sK = make_tensor(make_smem_ptr(s.k), typename C::SmemKAll{});
  constexpr int kPVN = kRowSumTC ? kDP + 8 : kDP;  // P.V's N
  Tensor sV = [&] {
    if constexpr (kRowSumTC) {
      return make_tensor(make_smem_ptr(s.vt), typename C::SmemVtAllExt{});
    } else {
      return make_tensor(make_smem_ptr(s.vt), typename C::SmemVtAll{});
    }
  }();

  typename C::MmaQK mma_qk;
  std::conditional_t<kRowSumTC, typename C::MmaPVExt, typename C::MmaPV> mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ(_, _, w));  // (MMA, 1, kDP / 32)
  Tensor tSrK = thr_qk.partition_fragment_B(sK);           // (MMA, 1, kDP / 32, stages)
  // P of the previous tile as P.V's A operand: per 32-key block, the 16 e4m3 values of the
  // A layout (4 bytes, 2 rows, 2 halves) in four 32-bit registers (see pv_a_register).
  Tensor tOrP = make_tensor<cutlass::float_e4m3_t>(
      Shape<Shape<_4, _2, _2>, _1, Int<kBlockN / 32>>{});  // (MMA, 1, kBlockN / 32)
  Tensor tOrPu = recast<uint32_t>(tOrP);
  static_assert(size(tOrPu) == kBlockN / 8, "four A registers per 32-key block");
  Tensor tOrV = thr_pv.partition_fragment_B(sV);           // (MMA, 1, kBlockN / 32, stages)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tOrPV = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kPVN>>{});
  // The output: P.V's first Dp columns (C layout: element i < Dp / 2 is the same row and column
  // for N = Dp and N = Dp + 8; elements Dp / 2 and Dp / 2 + 2 of the wider one are rows r0 and
  // r0 + 8 of column Dp + c0: the row sums).
  Tensor tOrO = partition_fragment_C(typename C::MmaPV{}, Shape<Int<kBlockM>, Int<kDP>>{});
  clear(tOrO);
  static_assert(size(tSrS) == kBlockN / 2 && size(tOrO) == kDP / 2, "64xN wgmma C fragments");

  // The wgmma C layout (CLayout_64xN): thread (warp wp, lane) holds rows r0 = 16 wp + lane / 4
  // and r0 + 8, columns c0 + 8 j + {0, 1} with c0 = 2 (lane % 4); fragment element i is row
  // r0 + 8 ((i >> 1) & 1), column c0 + (i & 1) + 8 (i >> 2). The four lanes of a quad share rows.
  const int r0 = 16 * (tid / 32) + (tid % 32) / 4;
  const int c0 = 2 * (tid % 4);
  // The row's Q scale as a sign (folded into the int -> fp32 conversion) and a magnitude.
  int q_sign[2];
  float q_abs[2], m_i[2], l_i[2], alpha[2];
  CUTE_UNROLL
  for (int j = 0; j < 2; ++j) {
    const int row = m0 + r0 + 8 * j;
    const float q_scale = row < p.seq_q ? p.q_scale[bh * p.seq_q + row] : 0.f;
    q_sign[j] = q_scale < 0.f ? -1 : 1;
    q_abs[j] = fabsf(q_scale);
    m_i[j] = -INFINITY;
    l_i[j] = 0.f;
    alpha[j] = 0.f;
  }

  // The issue order (kPingPong): round robin, consumer 0, 1, ..., kConsumers - 1, 0, ... One
  // named barrier per consumer: consumer w waits on kSchedBarrier + w before issuing a slot's
  // wgmmas and then lets the next consumer, (w + 1) % kConsumers, through; with 2 consumers
  // (ping-pong) the next one of w is 1 - w. Without kPingPong the consumers issue freely.
  // With 3 consumers the barrier ids are immediates, one branch per consumer (uniform): in
  // registers, ptxas spilled the next consumer's id in the key loop (160 registers).
  auto sched_wait = [&] {
    if constexpr (kPingPong && kConsumers == 2) {
      named_barrier_sync(kSchedBarrier + w, 2 * 128);
    } else if constexpr (kPingPong) {
      with_static<kConsumers>(w, [](auto ww) {
        named_barrier_sync<kSchedBarrier + decltype(ww)::value, 2 * 128>();
      });
    }
  };
  auto sched_signal = [&] {
    if constexpr (kPingPong && kConsumers == 2) {
      named_barrier_arrive(kSchedBarrier + (1 - w), 2 * 128);
    } else if constexpr (kPingPong) {
      with_static<kConsumers>(w, [](auto ww) {
        named_barrier_arrive<kSchedBarrier + (decltype(ww)::value + 1) % kConsumers, 2 * 128>();
      });
    }
  };
  auto issue_qk = [&](int st) {
    mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      cute::gemm(mma_qk, tSrQ(_, _, kb), tSrK(_, _, kb, st), tSrS);
      mma_qk.accumulate_ = GMMA::ScaleOut::One;
    }
  };
  auto issue_pv = [&](int st) {
    mma_pv.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tOrP); ++kb) {
      cute::gemm(mma_pv, tOrP(_, _, kb), tOrV(_, _, kb, st), tOrPV);
      mma_pv.accumulate_ = GMMA::ScaleOut::One;
    }
  };
  // acc = acc * exp2(m_old - m_new) + P.V of the previous tile (alpha of that tile).
  auto accumulate_pv = [&] {
    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) tOrO(i) = tOrO(i) * alpha[(i >> 1) & 1] + tOrPV(i);
    if constexpr (kRowSumTC) {
      CUTE_UNROLL
      for (int j = 0; j < 2; ++j) l_i[j] = l_i[j] * alpha[j] + tOrPV(size(tOrO) + 2 * j);
    }
  };
  // l = l alpha + the tile's row sums (the FADD sums of the fp32 P; with kRowSumTC they come
  // from P.V in accumulate_pv instead): the quad's, or with kLateRowSum this thread's columns',
  // reduced across the quad after the key loop.
  auto add_row_sums = [&](const float (&tile_sum)[2], const float (&alpha_t)[2]) {
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      if constexpr (kLateRowSum) {
        l_i[j] = l_i[j] * alpha_t[j] + tile_sum[j];
      } else if constexpr (!kRowSumTC) {
        l_i[j] = l_i[j] * alpha_t[j] + quad_sum(tile_sum[j]);
      }
    }
  };
  // Scores of tile t from the s32 accumulators -> online softmax -> P of tile t as e4m3 pairs
  // in the accumulator's order (pk; set_p puts them into tOrP once the previous P.V, which
  // reads tOrP, has completed) and the tile's alpha (alpha_t: the caller applies it to the
  // output after adding the previous P.V).
  // kMask: the tile may hold keys >= seq_k (the first or the last tile), which score -inf.
  //
  // Per score, the scheme computes s = (x * ks) * qs (x the s32 dot product, two fp32
  // roundings), m = max s and exp2(s - (m - 8)). Here t' = sign(qs) x * ks (the sign rides on
  // the int -> fp32 conversion's integer add, so t' = sign(qs) round(x ks) exactly), the row
  // max is taken over t' and scaled once: round(max t' |qs|) = max round(t' |qs|) = max s
  // (rounding is monotonic), bit for bit. The exponent is one FFMA, t' |qs| - (m - 8), with a
  // single rounding where the scheme rounds s first: it differs from the emulation's by at most
  // an ulp (a CPU model of this arithmetic on the GPU tests' shapes moved 4e-7 of the P codes;
  // LSE within 8e-6 of the emulation's). One fp32 instruction fewer per score.
  using PPairs = __nv_fp8x2_storage_t[kBlockN / 4];  // size(tSrS) / 2
  auto softmax = [&](int t, const float2 (&ks)[kBlockN / 8], auto mask, float (&alpha_t)[2],
                     PPairs& pk) {
    constexpr bool kMask = decltype(mask)::value;
    const int n0 = t * kBlockN;
    float sc[size(tSrS)];
    // Four partial maxima per row (max is exact in any order): short dependency chains.
    float part_max[2][4];
    CUTE_UNROLL
    for (int j = 0; j < 8; ++j) part_max[j / 4][j % 4] = -INFINITY;
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int rj = (i >> 1) & 1;
      const float2 k2 = ks[i >> 2];
      float v = int_to_float_exact(tSrS(i) * q_sign[rj]) * ((i & 1) ? k2.y : k2.x);
      if (kMask && n0 + c0 + (i & 1) + 8 * (i >> 2) >= p.seq_k) v = -INFINITY;
      sc[i] = v;
      part_max[rj][(i >> 2) & 3] = fmaxf(part_max[rj][(i >> 2) & 3], v);
    }
    float m_shift[2], tile_sum[2] = {0.f, 0.f};
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const float tile_max = fmaxf(fmaxf(part_max[j][0], part_max[j][1]),
                                   fmaxf(part_max[j][2], part_max[j][3]));
      // Every tile holds a key < seq_k, so the max is finite (q_abs may be 0: rows past seq_q).
      const float m_new = fmaxf(m_i[j], quad_max(tile_max) * q_abs[j]);
      alpha_t[j] = exp2f(m_i[j] - m_new);
      m_shift[j] = m_new - kPShift;
      m_i[j] = m_new;
    }
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); i += 2) {
      const int rj = (i >> 1) & 1;
      float a0 = fmaf(sc[i], q_abs[rj], -m_shift[rj]);
      float a1 = fmaf(sc[i + 1], q_abs[rj], -m_shift[rj]);
      if (kMask) {
        // A masked key's -inf times q_abs = 0 would be NaN: its exponent is -inf, its P 0.
        if (sc[i] == -INFINITY) a0 = -INFINITY;
        if (sc[i + 1] == -INFINITY) a1 = -INFINITY;
      }
      const float p0 = exp2f(a0);
      const float p1 = exp2f(a1);
      if constexpr (!kRowSumTC) {
        tile_sum[rj] += p0;
        tile_sum[rj] += p1;
      }
      pk[i / 2] = __nv_cvt_float2_to_fp8x2(make_float2(p0, p1), __NV_SATFINITE, __NV_E4M3);
    }
    add_row_sums(tile_sum, alpha_t);
  };
  // The softmax with one K scale per tile (kTileKScale; the scheme with k_block = 128): c[j] =
  // |qs| x ks of row j and the tile, positive (q_sign carries the sign). Per score one IMAD,
  // b = sign(qs) x + 0x4B400000 (the bits of the fp32 1.5 2^23 + sign(qs) x, exact for
  // |x| < 2^22 and, as an integer, increasing with sign(qs) x), one integer max of b (the row
  // max: c > 0, so the max commutes with the scaling), and one FFMA straight into the exponent,
  // fma(float(b), c, -(1.5 2^23 c + m - 8)): the product is exact inside the FMA, so the
  // exponent is x c - (m - 8) up to the rounding of the per-row constant (at most half an ulp
  // of 1.5 2^23 c, about c: the score of one unit of the int32 dot product) and the final
  // rounding. No per-score K-scale multiply, no scale registers. The scheme computes
  // s = (x ks) qs with two roundings and exp2(s - (m - 8)): the exponents differ by about one
  // dot-product unit of score, far below the INT8 codes' own error (a P code moves one e4m3
  // step where it sits that close to a rounding boundary). The row max m = round(x_max c) is
  // taken with c's rounding, not the scheme's two.
  constexpr int kMagicBits = 0x4B400000;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23, the float of kMagicBits
  auto softmax_tile = [&](int t, const float (&c)[2], auto mask, float (&alpha_t)[2],
                          PPairs& pk) {
    constexpr bool kMask = decltype(mask)::value;
    const int n0 = t * kBlockN;
    int sb[size(tSrS)];
    int part_max[2][4];  // four partial maxima per row: short dependency chains
    CUTE_UNROLL
    for (int j = 0; j < 8; ++j) part_max[j / 4][j % 4] = INT_MIN;
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int rj = (i >> 1) & 1;
      int b = tSrS(i) * q_sign[rj] + kMagicBits;
      // A masked key: INT_MIN (below every score's bits, which are positive); exponent -inf.
      if (kMask && n0 + c0 + (i & 1) + 8 * (i >> 2) >= p.seq_k) b = INT_MIN;
      sb[i] = b;
      part_max[rj][(i >> 2) & 3] = max(part_max[rj][(i >> 2) & 3], b);
    }
    float k_shift[2], tile_sum[2] = {0.f, 0.f};
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const int max_bits = quad_max_int(max(max(part_max[j][0], part_max[j][1]),
                                            max(part_max[j][2], part_max[j][3])));
      // Every tile's key n0 < seq_k sits in lane 0 of every quad: max_bits is a score's.
      // float(max_bits) - 1.5 2^23 is the integer x_max exactly.
      const float m_new = fmaxf(m_i[j], (__int_as_float(max_bits) - kMagic) * c[j]);
      alpha_t[j] = exp2f(m_i[j] - m_new);
      k_shift[j] = -fmaf(kMagic, c[j], m_new - kPShift);
      m_i[j] = m_new;
    }
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); i += 2) {
      const int rj = (i >> 1) & 1;
      float a0 = fmaf(__int_as_float(sb[i]), c[rj], k_shift[rj]);
      float a1 = fmaf(__int_as_float(sb[i + 1]), c[rj], k_shift[rj]);
      if (kMask) {
        if (sb[i] == INT_MIN) a0 = -INFINITY;
        if (sb[i + 1] == INT_MIN) a1 = -INFINITY;
      }
      const float p0 = exp2f(a0);
      const float p1 = exp2f(a1);
      if constexpr (!kRowSumTC) {
        tile_sum[rj] += p0;
        tile_sum[rj] += p1;
      }
      pk[i / 2] = __nv_cvt_float2_to_fp8x2(make_float2(p0, p1), __NV_SATFINITE, __NV_E4M3);
    }
    add_row_sums(tile_sum, alpha_t);
  };
  // P of tile t into P.V's A registers: register 4 kb + r + 2 h holds row r's column groups
  // j = 4 kb + 2 h (bytes 0, 1) and j + 1 (bytes 2, 3) (see pv_a_register). Called after the
  // wait for the P.V that read tOrP. (ptxas moves the e4m3 conversions here, as F2FP.MERGE_C
  // writing the A registers. Packing the registers inside the softmax and copying them here
  // instead, ptxas merged the copies away, so the softmax wrote the A registers while P.V still
  // read them, and it serialized every wgmma of the kernel: C7513.)
  auto set_p = [&](const PPairs& pk) {
    CUTE_UNROLL
    for (int q = 0; q < size(tOrPu); ++q) {
      const int kb = q / 4, r = q % 2, h = (q / 2) % 2;
      const int j = 4 * kb + 2 * h;
      tOrPu(q) = pv_a_register(pk[r + 2 * j], pk[r + 2 * (j + 1)]);
    }
  };
  // The key scales of this thread's columns of tile t, from the stage's shared copy. Past
  // Sk_pad (the last tile may reach past it) the copy holds stale values: those keys are
  // masked to -inf after the multiply.
  auto load_ks = [&](int st, float2 (&ks)[kBlockN / 8]) {
    CUTE_UNROLL
    for (int j = 0; j < kBlockN / 8; ++j) {
      ks[j] = *reinterpret_cast<const float2*>(&s.ks[st][c0 + 8 * j]);
    }
  };

  // One slot, in this consumer's turn: Q K^T of tile t (kQK) and then P.V of tile t - 1 (kPV),
  // two wgmma commit groups. Groups complete in order: the softmax of tile t starts once Q K^T
  // is done (wait for all but the last group) and runs while P.V still occupies the tensor
  // cores (FlashAttention-3's intra-warpgroup overlap); P.V's accumulator and A registers stay
  // untouched until the second wait. Then P of tile t moves into the A registers (P.V of tile
  // t - 1, which read them, has completed) and P.V is added to the output with the alpha of
  // tile t - 1.
  // The slot kinds are compile-time so that no wgmma sits on a divergent path (ptxas would
  // serialise them).
  float2 ks[kBlockN / 8];
  auto slot = [&](int t, auto qk, auto pv, auto mask) {
    constexpr bool kQK = decltype(qk)::value;
    constexpr bool kPV = decltype(pv)::value;
    // (kLateRowSum: in unsigned integers; t >= 0, and t >= 1 where P.V is issued)
    const unsigned ut = static_cast<unsigned>(t);
    const int st = kLateRowSum ? static_cast<int>(ut % kStages) : t % kStages;
    const int sv = kLateRowSum ? static_cast<int>((ut + kStages - 1) % kStages)
                               : (t + kStages - 1) % kStages;
    if constexpr (kQK) {
      ClusterBarrier::wait(&s.k_full[st], kLateRowSum ? static_cast<int>((ut / kStages) & 1)
                                                      : (t / kStages) & 1);
    }
    if constexpr (kPV) {
      ClusterBarrier::wait(&s.v_full[sv], kLateRowSum ? static_cast<int>(((ut - 1) / kStages) & 1)
                                                      : ((t - 1) / kStages) & 1);
    }
    // kTileKScale: the tile's K scale (its first key's; the scheme's scales are equal within
    // the tile), read before the wgmmas (two registers across the batch: c of both rows); with
    // 3 consumers after them (kScaleLate: no register across the batch, which is the key loop's
    // register peak; the LDS latency hides behind the row max, which does not use it).
    constexpr bool kScaleLate = kConsumers > 2;
    float c_t[2];
    auto read_scale = [&] {
      const float k_tile_scale = s.ks[st][0];
      CUTE_UNROLL
      for (int j = 0; j < 2; ++j) c_t[j] = q_abs[j] * k_tile_scale;
    };
    if constexpr (kTileKScale && kQK && !kScaleLate) read_scale();
    sched_wait();
    if constexpr (kQK) warpgroup_fence_operand(tSrS);
    if constexpr (kPV) {
      warpgroup_fence_operand(tOrP);
      warpgroup_fence_operand(tOrPV);
    }
    warpgroup_arrive();
    if constexpr (kQK) {
      issue_qk(st);
      warpgroup_commit_batch();
    }
    if constexpr (kPV) {
      issue_pv(sv);
      warpgroup_commit_batch();
    }
    // The last consumer's last slot (the only one without Q K^T) does not signal: every arrival
    // on a scheduling barrier is then matched by one sync (see the count below). (With 2
    // consumers "not the last" is written w == 0, which keeps the SASS of the kernel before
    // kConsumers; w != 1 compiled to another, equivalent, compare.)
    if (kQK || (kConsumers == 2 ? w == 0 : w != kConsumers - 1)) sched_signal();
    PPairs pk;
    float alpha_t[2];
    // With 3 consumers (kPVFirst), P.V of tile t - 1 is waited for and added to the output
    // before the softmax of tile t, so that its 32 accumulator registers are free during the
    // softmax (with 160 registers the 2-consumer order spilled 52 bytes in and around the key
    // loop, the other 3-consumer changes included; this order none). ptxas hoists the P.V wait
    // above the exponentials in the 2-consumer kernel anyway (session 12), so only the row max
    // is no longer beside the consumer's own P.V. The arithmetic is the same.
    constexpr bool kPVFirst = kConsumers > 2 && kQK && kPV;
    auto finish_pv = [&] {
      warpgroup_fence_operand(tOrPV);
      warpgroup_fence_operand(tOrP);
      ClusterBarrier::arrive(&s.v_empty[sv]);
    };
    if constexpr (kQK) {
      if constexpr (kPVFirst) {
        warpgroup_wait<0>();  // Q K^T of tile t and P.V of tile t - 1
        finish_pv();
        accumulate_pv();
      } else {
        warpgroup_wait<kPV ? 1 : 0>();  // Q K^T of tile t (P.V of tile t - 1 may still run)
      }
      warpgroup_fence_operand(tSrS);
      if constexpr (kTileKScale) {
        if constexpr (kScaleLate) {
          read_scale();
          // ClusterBarrier::arrive's asm has no memory clobber: keep the load above it.
          asm volatile("" ::: "memory");
        }
        ClusterBarrier::arrive(&s.k_empty[st]);  // the scale was read before the release
        softmax_tile(t, c_t, mask, alpha_t, pk);
      } else {
        // The key scales are read here, not before the wgmmas: the accumulators of both
        // products plus the output's leave no registers to hold them across the batch. The
        // release of the K stage (mbarrier.arrive: release semantics) follows the reads.
        load_ks(st, ks);
        // ClusterBarrier::arrive's asm has no memory clobber: keep the loads above it.
        asm volatile("" ::: "memory");
        ClusterBarrier::arrive(&s.k_empty[st]);
        softmax(t, ks, mask, alpha_t, pk);
      }
    }
    if constexpr (kPV && !kPVFirst) {
      warpgroup_wait<0>();
      finish_pv();
    }
    if constexpr (kQK) set_p(pk);
    if constexpr (kPV && !kPVFirst) accumulate_pv();
    if constexpr (kQK) {
      CUTE_UNROLL
      for (int j = 0; j < 2; ++j) alpha[j] = alpha_t[j];
    }
  };

  // Consumer 0 issues first: the last consumer lets it through once. Every consumer then runs
  // n_tiles + 1 slots, each after one sync on its own barrier (n_tiles + 1 syncs per barrier).
  // Arrivals: consumer w < kConsumers - 1 signals w + 1 after each of its n_tiles + 1 slots; the
  // last one signals consumer 0 once here and after each slot but its last: 1 + n_tiles. So
  // each barrier gets n_tiles + 1 arrivals of 128 threads for n_tiles + 1 syncs of 128: every
  // use completes at 2 x 128. One turn circulates (a consumer arrives only after its own sync,
  // which needed the previous consumer's arrival), so no consumer arrives twice on a barrier
  // before its owner has synced there.
  if (w == kConsumers - 1) sched_signal();
  ClusterBarrier::wait(&s.q_full, 0);
  // The first and the last key tile are masked (either may hold keys past seq_k); the steady
  // state is not.
  using cute::false_type;
  using cute::true_type;
  slot(0, true_type{}, false_type{}, true_type{});
  if constexpr (kConsumers == 2) {
    if constexpr (kUnroll2) {
      // two slots a loop iteration (kUnroll2): one schedule for a pair of tiles
#pragma unroll 2
      for (int t = 1; t < n_tiles - 1; ++t) slot(t, true_type{}, true_type{}, false_type{});
    } else {
      for (int t = 1; t < n_tiles - 1; ++t) slot(t, true_type{}, true_type{}, false_type{});
    }
    if (n_tiles > 1) slot(n_tiles - 1, true_type{}, true_type{}, true_type{});
  } else {
    // The same slots; the last tile's test on the loop counter (with n_tiles > 1, ptxas
    // spilled a register around it at 160 registers).
    int t = 1;
    for (; t < n_tiles - 1; ++t) slot(t, true_type{}, true_type{}, false_type{});
    if (t < n_tiles) slot(t, true_type{}, true_type{}, true_type{});
  }
  slot(n_tiles, false_type{}, true_type{}, false_type{});
  if constexpr (kLateRowSum) {  // the row sums of the quad's columns
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) l_i[j] = quad_sum(l_i[j]);
  }

  // Epilogue: out = acc / l * v_scale in the output dtype; LSE in natural log. (b, h computed
  // here, not kept live across the key loop.)
  const int b = static_cast<int>(bh / p.heads);
  const int h = static_cast<int>(bh % p.heads);
  const float* vs = p.v_scale + bh * kDP;
  OutT* out = reinterpret_cast<OutT*>(p.out);
  // The first row, m0 + r0. With 3 consumers it is recomputed here from %tid.x and %ctaid.x
  // (volatile reads, not merged with the prologue's): otherwise ptxas kept the prologue's
  // 64-bit q_scale / LSE offset of the row across the key loop and spilled it.
  int row0 = m0 + r0;
  if constexpr (kConsumers > 2) {
    unsigned thread, cta;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(thread));
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(cta));
    const int consumer = static_cast<int>(thread / 128) - 1, lane = thread % 128;
    row0 = (kConsumers * static_cast<int>(cta) + consumer) * kBlockM + 16 * (lane / 32) +
           (lane % 32) / 4;
  }
  auto out_row = [&](int j) {  // this thread's row j of the output
    return out + b * p.out_stride_b + static_cast<int64_t>(row0 + 8 * j) * p.out_stride_s +
           h * p.out_stride_h;
  };
  if constexpr (kFastEpilogue) {
    // This thread's columns are the pairs (c, c + 1), c = c0 + 8 k (c0 even): their V scales
    // as float2 loads, all issued before the first store, 1 / l once per row, the pairs stored
    // as 4-byte words where the row is 4-byte aligned (see kFastEpilogue). The same bits.
    float2 vsc[kDP / 8];
    CUTE_UNROLL
    for (int k = 0; k < kDP / 8; ++k) vsc[k] = *reinterpret_cast<const float2*>(vs + c0 + 8 * k);
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      if (row0 + 8 * j >= p.seq_q) continue;
      OutT* orow = out_row(j);
      const float inv_l = 1.f / l_i[j];
      const bool pairs = (reinterpret_cast<uintptr_t>(orow) & 3) == 0;
      CUTE_UNROLL
      for (int k = 0; k < kDP / 8; ++k) {
        const int c = c0 + 8 * k;
        const int i = 4 * k + 2 * j;  // the fragment's (row j, column c); i + 1: column c + 1
        const OutT x0 = from_float<OutT>(tOrO(i) * inv_l * vsc[k].x);
        const OutT x1 = from_float<OutT>(tOrO(i + 1) * inv_l * vsc[k].y);
        if (pairs && c + 1 < p.head_dim) {
          static_assert(sizeof(OutT) == 2, "16-bit outputs");
          const OutT pair[2] = {x0, x1};
          uint32_t word;
          memcpy(&word, pair, 4);
          *reinterpret_cast<uint32_t*>(orow + c) = word;
        } else {
          if (c < p.head_dim) orow[c] = x0;
          if (c + 1 < p.head_dim) orow[c + 1] = x1;
        }
      }
    }
  } else {
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      if (row0 + 8 * j >= p.seq_q) continue;
      OutT* orow = out_row(j);
      CUTE_UNROLL
      for (int i = 0; i < size(tOrO); ++i) {
        if (((i >> 1) & 1) != j) continue;
        const int c = c0 + (i & 1) + 8 * (i >> 2);
        if (c < p.head_dim) orow[c] = from_float<OutT>(tOrO(i) / l_i[j] * vs[c]);
      }
    }
  }
  if (p.lse != nullptr && (tid & 3) == 0) store_lse(p, bh, row0, m_i, l_i);
}

// kConsumers consumer warpgroups (2; or 3 at Dp = 64), kPingPong: they issue in turn (2: the
// ping-pong; 3: round robin, built for bf16 as the A/B) or freely (3: the built default).
// kLateRowSum (not with kRowSumTC): every thread keeps the row sum of its own columns across
// the key loop (rescaled by each tile's alpha, as the quad's sum would be) and the quad adds
// them once after it, instead of a quad reduction (2 SHFL + 2 FADD a row) per tile; and the
// stage/phase arithmetic of a slot in unsigned integers. The per-tile kernels at padded head
// dim 128 use it: runs 75-76 (H100, kernel-only, interleaved, same inputs) measured it at
// +0.1% to +4.0% over the kernel without it at (1,16896,24,128), (1,32760,40,128) and
// (1,4608,24,128) (5 comparisons, never slower), while either half alone was slower at 16896
// (-1.5%: the late sum; -1.1%: the unsigned arithmetic). The sum's fp32 order changes only.
// kFastEpilogue: the output stores with the V scales loaded before any store, 1 / l per row and
// 4-byte pair stores (the same bits). Run 73's SASS profile found the epilogue's per-element
// load, reciprocal and 2-byte store serialised (~5% of the kernel at (1,16896,24,128), 1 CTA
// an SM). Runs 79-80 (H100, kernel-only, interleaved): per-tile kernels at padded head dim 128
// (1,4608,24,128) 680.4 -> 764.0 and 694.3 -> 763.0 TFLOPS, (1,16896,24,128) 893.8 -> 900.4
// and 882.4 -> 893.5, at 64 with 3 consumers (2,4250,24,64) 475.8 -> 503.3; but
// (1,32760,40,128) 907.8 -> 844.9, 907.8 -> 835.2, 901.7 -> 844.8 (not understood: the key loop
// is the same source, which ptxas schedules differently; run 82, another H100: 869.5 -> 876.7
// and 874.3 -> 880.8 there). So the per-tile launchers take it up to kFastEpilogueMaxTiles key
// tiles.
// kUnroll2: the steady key loop unrolled by two (957 SASS instructions a pair of tiles against
// 490 a tile at padded head dim 128, no spills): ptxas schedules two slots as one block. Runs
// 86-87 (H100, kernel-only, interleaved, the same bits) with the fast epilogue:
// (1,16896,24,128) 895.8 -> 921.7, 896.9 -> 920.2, 852.5 -> 874.6; (1,4608,24,128) 753.0 ->
// 775.1; with the old epilogue at (1,32760,40,128) 915.5 -> 874.6, 908.1 -> 855.8, 884.3 ->
// 899.9, 880.9 -> 871.6 (with the fast one there 893.3 and 887.5 against 884.3 and 880.9); run
// 90, float16 output: 16896 896.5 -> 919.3, 826.9 -> 856.9, 4608 762.6 -> 784.1. So the
// kernels with the fast epilogue (padded head dim 128, 2 consumers) take it; those above
// kFastEpilogueMaxTiles stay as they were.
constexpr int kFastEpilogueMaxTiles = 132;

// The 128-key tiles of seq_k keys (the kernel's loop count; the launchers' epilogue choice).
__host__ __device__ constexpr int key_tiles(int seq_k) { return (seq_k + kBlockN - 1) / kBlockN; }
// Whether the per-tile launchers take the fast epilogue (kFastEpilogue) for seq_k keys.
constexpr bool fast_epilogue(int seq_k) { return key_tiles(seq_k) <= kFastEpilogueMaxTiles; }
template <int kDP, typename OutT, bool kTileKScale, int kConsumers = 2, bool kPingPong = true,
          bool kRowSumTC = false, bool kLateRowSum = false, bool kFastEpilogue = false,
          bool kUnroll2 = false>
__global__ void __launch_bounds__(kThreads<kConsumers>, 1)
    fp8_attention_ws_kernel(const __grid_constant__ KernelParams<kDP> kp) {
  check_consumers<kDP, kConsumers>();
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  auto& s = *reinterpret_cast<Storage<kDP, kConsumers, kRowSumTC>*>(smem_raw);
  const int n_tiles = key_tiles(kp.p.seq_k);  // >= 1 (the host checks)
  // Warp-uniform for ptxas (a shuffle from lane 0): what derives from it (named barrier ids,
  // the consumer's shared-memory slices) can live in uniform registers. With P in registers
  // the consumers spilled 28 bytes at Dp = 128 without it, none with it.
  const int warp_group = __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / 128, 0);
  if (threadIdx.x == 0) {
    ClusterBarrier::init(&s.q_full, 1);
    CUTE_UNROLL
    for (int st = 0; st < kStages; ++st) {
      ClusterBarrier::init(&s.k_full[st], 1);
      ClusterBarrier::init(&s.v_full[st], 1);
      ClusterBarrier::init(&s.k_empty[st], kConsumers * 128);
      ClusterBarrier::init(&s.v_empty[st], kConsumers * 128);
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (kRowSumTC) {
    // The 8 rows of ones after each stage's Dp rows of V^T (e4m3 1.0 is 0x38: every byte, so
    // the swizzle cannot change them). The wgmmas read them through the async proxy.
    for (int i = threadIdx.x; i < kStages * 8 * kBlockN / 4; i += blockDim.x) {
      const int st = i / (8 * kBlockN / 4), w = i % (8 * kBlockN / 4);
      reinterpret_cast<uint32_t*>(s.vt + (st * (kDP + 8) + kDP) * kBlockN)[w] = 0x38383838u;
    }
    cutlass::arch::fence_view_async_shared();
  }
  __syncthreads();
  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x == 0) produce<kDP, kConsumers, kTileKScale, kRowSumTC>(kp, s, n_tiles);
  } else {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs<kConsumers>>();
    consume<kDP, kConsumers, OutT, kTileKScale, kPingPong, kRowSumTC, kLateRowSum,
            kFastEpilogue, kUnroll2>(kp, s, n_tiles, warp_group - 1);
  }
}

// kTileKScale: the per-tile K scale variant (p.k_scale equal within every 128-key tile).
// kConsumers, kPingPong: see fp8_attention_ws_kernel.
template <int kDP, typename OutT, bool kTileKScale = false, int kConsumers = 2,
          bool kPingPong = true, bool kRowSumTC = false, bool kLateRowSum = false,
          bool kFastEpilogue = false, bool kUnroll2 = false>
cudaError_t launch(const Fp8AttentionSm90Params& p, int batch, cudaStream_t stream) {
  // Sk_pad is the quantization pass's (a multiple of 64); TMA reads the last tile's keys past
  // it as zeros.
  if (p.seq_k <= 0 || p.seq_k_pad % 64 != 0 || p.seq_k > p.seq_k_pad) {
    return cudaErrorInvalidValue;
  }
  const int bh = batch * p.heads;
  KernelParams<kDP> kp{make_tma_q<kDP>(p.q8, p.seq_q, bh),
                       make_tma_k<kDP>(p.k8, p.seq_k_pad, bh),
                       make_tma_vt<kDP>(p.vt8, p.seq_k_pad, bh), p, bh};
  const int smem = static_cast<int>(sizeof(Storage<kDP, kConsumers, kRowSumTC>));
  auto kernel =
      fp8_attention_ws_kernel<kDP, OutT, kTileKScale, kConsumers, kPingPong, kRowSumTC,
                              kLateRowSum, kFastEpilogue, kUnroll2>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int rows_per_cta = kConsumers * kBlockM;
  const dim3 grid((p.seq_q + rows_per_cta - 1) / rows_per_cta, bh);
  kernel<<<grid, kThreads<kConsumers>, smem, stream>>>(kp);
  return cudaGetLastError();
}

// The per-tile launchers' choice by the number of key tiles (one place for the policy): the
// fast epilogue up to kFastEpilogueMaxTiles, with the key loop unrolled by two where
// kUnrollFast (kUnroll2), and the kernel before both above it.
template <int kDP, typename OutT, int kConsumers, bool kPingPong, bool kRowSumTC,
          bool kLateRowSum, bool kUnrollFast>
cudaError_t launch_tile(const Fp8AttentionSm90Params& p, int batch, cudaStream_t stream) {
  if (fast_epilogue(p.seq_k)) {
    return launch<kDP, OutT, true, kConsumers, kPingPong, kRowSumTC, kLateRowSum, true,
                  kUnrollFast>(p, batch, stream);
  }
  return launch<kDP, OutT, true, kConsumers, kPingPong, kRowSumTC, kLateRowSum>(p, batch, stream);
}

}  // namespace fp8_sm90_ws
}  // namespace xdit_ops
