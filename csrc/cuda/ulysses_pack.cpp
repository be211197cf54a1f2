// Torch-aware launchers for xdit_ops::ulysses_pack_qkv, ::ulysses_unpack_out,
// ::ulysses_place_gathered and the push ops (schemas in xdit_ops/ops/ulysses_pack.py).
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "utils.h"
#include "xdit_ops/ulysses_pack.h"

namespace xdit_ops {

namespace {

// Checks the per-rank head counts (1..kMaxUlyssesRanks of them, none negative); returns their
// sum.
int64_t check_heads(at::IntArrayRef heads, const char* op) {
  XDIT_CHECK(!heads.empty() && heads.size() <= static_cast<size_t>(kMaxUlyssesRanks), op,
             ": heads must list 1..", kMaxUlyssesRanks, " per-rank counts, got ", heads.size());
  int64_t total = 0;
  for (size_t j = 0; j < heads.size(); ++j) {
    XDIT_CHECK(heads[j] >= 0, op, ": heads[", j, "] = ", heads[j], " is negative");
    total += heads[j];
  }
  return total;
}

// Fills num_ranks and head_start (of pack's, unpack's or push's params) from the per-rank
// counts, checked (against H unless H < 0); returns their sum.
template <typename Params>
int64_t fill_head_start(Params& p, at::IntArrayRef heads, int64_t H, const char* op) {
  const int64_t total = check_heads(heads, op);
  XDIT_CHECK(H < 0 || total == H, op, ": sum(heads) = ", total, " != H = ", H, " (heads ",
             heads, ")");
  p.head_start[0] = 0;
  for (size_t j = 0; j < heads.size(); ++j) {
    p.head_start[j + 1] = static_cast<int>(p.head_start[j] + heads[j]);
  }
  p.num_ranks = static_cast<int>(heads.size());
  return total;
}

// q, k, v of the pack and the push: [B, L, H, D] each, one shape, dtype and CUDA device, the
// head dim contiguous (other strides free).
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  XDIT_CHECK(q.dim() == 4, op, ": q must be [B, L, H, D], got ", q.sizes());
  XDIT_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": q ", q.sizes(), ", k ",
             k.sizes(), " and v ", v.sizes(), " must have one shape");
  XDIT_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
             ": q, k, v dtypes differ: ", q.scalar_type(), ", ", k.scalar_type(), ", ",
             v.scalar_type());
  XDIT_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(), op,
             ": q, k, v must be on one CUDA device, got ", q.device(), ", ", k.device(), ", ",
             v.device());
  const int64_t D = q.size(3);
  for (const at::Tensor* t : {&q, &k, &v}) {
    XDIT_CHECK(D <= 1 || t->stride(3) == 1, op, ": head_dim must be the contiguous dimension, ",
               "got strides ", t->strides());
  }
}

// The pointers and applied strides of q, k, v (checked by check_qkv) in pack's or push's params.
template <typename Params>
void set_qkv_sources(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const at::Tensor* qkv[3] = {&q, &k, &v};
  for (int t = 0; t < 3; ++t) {
    p.src[t] = qkv[t]->const_data_ptr();
    p.src_stride_b[t] = applied_stride(*qkv[t], 0);
    p.src_stride_s[t] = applied_stride(*qkv[t], 1);
    p.src_stride_h[t] = applied_stride(*qkv[t], 2);
  }
}

// recv of unpack and place: the flat buffer an all-to-all filled.
void check_recv(const at::Tensor& recv, const char* op) {
  XDIT_CHECK(recv.is_cuda(), op, ": recv must be on a CUDA device, got ", recv.device());
  XDIT_CHECK(recv.dim() == 1 && recv.is_contiguous(), op,
             ": recv must be a flat contiguous buffer, got sizes ", recv.sizes(), " strides ",
             recv.strides());
}

// head_dim D of a recv holding `row` * D elements (row: the product named by `row_expr`).
int64_t recv_head_dim(const at::Tensor& recv, int64_t row, const char* row_expr,
                      const char* op) {
  XDIT_CHECK(row > 0 && recv.numel() % row == 0, op, ": recv has ", recv.numel(),
             " elements, not a multiple of ", row_expr, " = ", row);
  return recv.numel() / row;
}

}  // namespace

at::Tensor ulysses_pack_qkv_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 at::IntArrayRef heads) {
  constexpr const char* kOp = "ulysses_pack_qkv";
  check_qkv(q, k, v, kOp);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  UlyssesPackParams p;
  fill_head_start(p, heads, H, kOp);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({3 * B * L * H * D}, q.options());
  set_qkv_sources(p, q, k, v);
  p.out = out.data_ptr();
  p.batch = B;
  p.seq = L;
  p.heads = H;
  p.head_dim = D;
  XDIT_CUDA_CHECK(ulysses_pack_qkv(p, static_cast<int>(q.element_size()),
                                   num_sms(q.get_device()),
                                   c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor ulysses_unpack_out_cuda(const at::Tensor& recv, at::IntArrayRef heads, int64_t B,
                                   int64_t J, int64_t L, bool joint_front) {
  constexpr const char* kOp = "ulysses_unpack_out";
  check_recv(recv, kOp);
  XDIT_CHECK(B >= 0 && J >= 0 && L >= 0, kOp, ": B, J, L must be >= 0, got ", B, ", ", J, ", ",
             L);
  UlyssesUnpackParams p;
  const int64_t H = fill_head_start(p, heads, -1, kOp);
  const int64_t D = recv_head_dim(recv, B * (J + L) * H, "B * (J + L) * H", kOp);
  const c10::cuda::CUDAGuard guard(recv.device());
  at::Tensor out = at::empty({B, J + L, H, D}, recv.options());
  p.recv = recv.const_data_ptr();
  p.out = out.data_ptr();
  p.batch = B;
  p.joint = J;
  p.seq = L;
  p.heads = H;
  p.head_dim = D;
  p.joint_front = joint_front;
  XDIT_CUDA_CHECK(ulysses_unpack_out(p, static_cast<int>(recv.element_size()),
                                     num_sms(recv.get_device()),
                                     c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> ulysses_place_gathered_cuda(
    const at::Tensor& recv, int64_t U, int64_t B, int64_t L, int64_t h,
    const std::optional<at::Tensor>& q_j, const std::optional<at::Tensor>& k_j,
    const std::optional<at::Tensor>& v_j, int64_t head_start, bool joint_kv) {
  constexpr const char* kOp = "ulysses_place_gathered";
  check_recv(recv, kOp);
  XDIT_CHECK(U >= 1 && B >= 0 && L >= 0 && h >= 1, kOp, ": need U >= 1, B >= 0, L >= 0, h >= 1, ",
             "got U=", U, " B=", B, " L=", L, " h=", h);
  const int64_t D = recv_head_dim(recv, U * 3 * B * L * h, "U * 3 * B * L * h", kOp);
  const bool has_joint = q_j.has_value();
  XDIT_CHECK(has_joint == k_j.has_value() && has_joint == v_j.has_value(), kOp,
             ": pass all of q_j, k_j, v_j or none");
  UlyssesPlaceParams p{};
  int64_t J = 0;
  if (has_joint) {
    const at::Tensor* joint[3] = {&*q_j, &*k_j, &*v_j};
    const at::Tensor& j0 = *joint[0];
    XDIT_CHECK(j0.dim() == 4 && j0.size(0) == B && j0.size(3) == D, kOp,
               ": q_j must be [B, J, H, D] = [", B, ", J, H, ", D, "], got ", j0.sizes());
    J = j0.size(1);
    XDIT_CHECK(head_start >= 0 && head_start + h <= j0.size(2), kOp, ": heads [", head_start,
               ", ", head_start + h, ") are outside the ", j0.size(2), " joint heads");
    for (int t = 0; t < 3; ++t) {
      const at::Tensor& x = *joint[t];
      XDIT_CHECK(x.sizes() == j0.sizes() && x.scalar_type() == recv.scalar_type() &&
                     x.device() == recv.device(),
                 kOp, ": joint tensor ", t, " is ", x.sizes(), " ", x.scalar_type(), " on ",
                 x.device(), "; need ", j0.sizes(), " ", recv.scalar_type(), " on ",
                 recv.device());
      XDIT_CHECK(D <= 1 || x.stride(3) == 1, kOp, ": head_dim of joint tensor ", t,
                 " must be contiguous, got strides ", x.strides());
      p.joint_src[t] = x.const_data_ptr();
      p.joint_stride_b[t] = applied_stride(x, 0);
      p.joint_stride_s[t] = applied_stride(x, 1);
      p.joint_stride_h[t] = x.stride(2);
    }
  }
  const int64_t Jk = joint_kv ? J : 0;
  const c10::cuda::CUDAGuard guard(recv.device());
  at::Tensor qbuf = at::empty({B, J + U * L, h, D}, recv.options());
  at::Tensor kv = at::empty({2, B, Jk + U * L, h, D}, recv.options());
  p.recv = recv.const_data_ptr();
  p.joint_head_start = head_start;
  p.qbuf = qbuf.data_ptr();
  p.kv = kv.data_ptr();
  p.ranks = U;
  p.batch = B;
  p.seq = L;
  p.heads = h;
  p.head_dim = D;
  p.joint = J;
  p.joint_kv = Jk;
  XDIT_CUDA_CHECK(ulysses_place_gathered(p, static_cast<int>(recv.element_size()),
                                         num_sms(recv.get_device()),
                                         c10::cuda::getCurrentCUDAStream().stream()));
  return {qbuf, kv};
}

namespace {

// dst of the push ops: one flat buffer per rank of `heads`, on q's device (peer memory mapped
// into this process shows as a tensor of the local device), q's dtype, each at least
// need(j) elements.
template <typename Need>
void check_push_dst(at::TensorList dst, at::IntArrayRef heads, const at::Tensor& like,
                    Need need, const char* op) {
  XDIT_CHECK(dst.size() == heads.size(), op, ": dst has ", dst.size(), " buffers for ",
             heads.size(), " ranks (heads ", heads, ")");
  for (size_t j = 0; j < dst.size(); ++j) {
    const at::Tensor& d = dst[j];
    XDIT_CHECK(d.device() == like.device() && d.scalar_type() == like.scalar_type(), op,
               ": dst[", j, "] is ", d.scalar_type(), " on ", d.device(), "; need ",
               like.scalar_type(), " on ", like.device());
    XDIT_CHECK(d.dim() == 1 && d.is_contiguous(), op, ": dst[", j,
               "] must be a flat contiguous buffer, got sizes ", d.sizes());
    XDIT_CHECK(d.numel() >= need(j), op, ": dst[", j, "] has ", d.numel(),
               " elements, the push needs ", need(j));
  }
}

// XDIT_OPS_PUSH_KERNEL: v2 (default, also when unset or empty) or v1, the push kernels'
// first version, kept selectable for one release to compare with; v3 runs v2's kernels here
// (it changes what usp_attention does around them: the output goes back by rank blocks,
// ulysses_push_out_blocks, then ulysses_unpack_out). Read on every call, so a process can time
// each (benchmarks/bench_ulysses_push.py); a CUDA graph keeps the kernel it captured.
int push_kernel_version(const char* op) {
  const char* env = std::getenv("XDIT_OPS_PUSH_KERNEL");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "v2") == 0 ||
      std::strcmp(env, "v3") == 0) {
    return 2;
  }
  XDIT_CHECK(std::strcmp(env, "v1") == 0, op,
             ": XDIT_OPS_PUSH_KERNEL must be v1, v2 or v3, got '", env, "'");
  return 1;
}

}  // namespace

void ulysses_push_qkv_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           at::IntArrayRef heads, at::TensorList dst, int64_t rank, int64_t J,
                           int64_t Jk, at::OptionalIntArrayRef src_head_start) {
  constexpr const char* kOp = "ulysses_push_qkv";
  check_qkv(q, k, v, kOp);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  XDIT_CHECK(H <= kMaxPushHeads, kOp, ": at most ", kMaxPushHeads, " heads, got H = ", H);
  UlyssesPushParams p{};
  // with src_head_start, heads is a chunk of every share (its sum need not be H)
  const int64_t pushed = fill_head_start(p, heads, src_head_start.has_value() ? -1 : H, kOp);
  if (src_head_start.has_value()) {
    const at::IntArrayRef s = *src_head_start;
    XDIT_CHECK(s.size() == heads.size(), kOp, ": src_head_start has ", s.size(),
               " entries for ", heads.size(), " destinations");
    for (size_t j = 0; j < s.size(); ++j) {
      XDIT_CHECK(s[j] >= 0 && s[j] + heads[j] <= H, kOp, ": src_head_start[", j, "] = ", s[j],
                 " puts ", heads[j], " heads outside the ", H, " source heads");
      p.src_head_start[j] = static_cast<int>(s[j]);
    }
    p.src_head_given = true;
    XDIT_CHECK(pushed <= kMaxPushHeads, kOp, ": at most ", kMaxPushHeads, " pushed heads");
  }
  const int64_t U = p.num_ranks;
  XDIT_CHECK(rank >= 0 && rank < U, kOp, ": rank ", rank, " is outside [0, ", U, ")");
  XDIT_CHECK(J >= 0 && (Jk == 0 || Jk == J), kOp, ": need J >= 0 and Jk in {0, J}, got J=", J,
             " Jk=", Jk);
  check_push_dst(dst, heads, q, [&](size_t j) {
    return B * (J + U * L) * heads[j] * D + 2 * B * (Jk + U * L) * heads[j] * D;
  }, kOp);
  set_qkv_sources(p, q, k, v);
  for (int64_t j = 0; j < U; ++j) p.dst[j] = dst[j].data_ptr();
  p.batch = B;
  p.seq = L;
  p.heads = pushed;
  p.head_dim = D;
  p.joint = J;
  p.joint_kv = Jk;
  p.rank = static_cast<int>(rank);
  p.kernel_version = push_kernel_version(kOp);
  XDIT_CHECK(!p.src_head_given || p.kernel_version == 2, kOp,
             ": src_head_start needs the v2 kernel (XDIT_OPS_PUSH_KERNEL=v1 is set)");
  const c10::cuda::CUDAGuard guard(q.device());
  XDIT_CUDA_CHECK(ulysses_push_qkv(p, static_cast<int>(q.element_size()),
                                   num_sms(q.get_device()),
                                   c10::cuda::getCurrentCUDAStream().stream()));
}

namespace {

// ulysses_push_out (rank_blocks false) and ulysses_push_out_blocks (true; joint_front unused):
// the same checks, sizes and kernels. head_offset (push_out only): where o's heads go in an
// output row instead of this rank's place in `heads` (a head chunk).
void push_out_cuda(const at::Tensor& o, at::IntArrayRef heads, at::TensorList dst, int64_t rank,
                   int64_t L, bool joint_front, bool rank_blocks,
                   std::optional<int64_t> head_offset, const char* kOp) {
  XDIT_CHECK(o.is_cuda(), kOp, ": o must be on a CUDA device, got ", o.device());
  const int64_t H = check_heads(heads, kOp);
  const int64_t U = static_cast<int64_t>(heads.size());
  XDIT_CHECK(rank >= 0 && rank < U, kOp, ": rank ", rank, " is outside [0, ", U, ")");
  int64_t h0 = 0;
  for (int64_t j = 0; j < rank; ++j) h0 += heads[j];
  if (head_offset.has_value()) {
    XDIT_CHECK(*head_offset >= 0 && *head_offset + heads[rank] <= H, kOp, ": head_offset = ",
               *head_offset, " puts o's ", heads[rank], " heads outside the ", H,
               " heads of an output row");
    h0 = *head_offset;
  }
  XDIT_CHECK(o.dim() == 4 && o.size(2) == heads[rank] && L >= 0 && o.size(1) >= U * L, kOp,
             ": o must be [B, J + U*L, h, D] with U=", U, " L=", L, " h=heads[", rank, "]=",
             heads[rank], ", got ", o.sizes());
  const int64_t B = o.size(0), J = o.size(1) - U * L, D = o.size(3);
  XDIT_CHECK(D <= 1 || o.stride(3) == 1, kOp, ": head_dim of o must be contiguous, got strides ",
             o.strides());
  check_push_dst(dst, heads, o, [&](size_t) { return B * (J + L) * H * D; }, kOp);
  UlyssesPushOutParams p{};
  p.src = o.const_data_ptr();
  p.src_stride_b = applied_stride(o, 0);
  p.src_stride_s = applied_stride(o, 1);
  p.src_stride_h = applied_stride(o, 2);
  for (int64_t j = 0; j < U; ++j) p.dst[j] = dst[j].data_ptr();
  p.batch = B;
  p.joint = J;
  p.seq = L;
  p.heads_total = H;
  p.head_start = h0;
  p.heads = heads[rank];
  p.head_dim = D;
  p.joint_front = joint_front;
  p.num_ranks = static_cast<int>(U);
  p.rank = static_cast<int>(rank);
  p.kernel_version = push_kernel_version(kOp);
  p.rank_blocks = rank_blocks;
  const c10::cuda::CUDAGuard guard(o.device());
  XDIT_CUDA_CHECK(ulysses_push_out(p, static_cast<int>(o.element_size()),
                                   num_sms(o.get_device()),
                                   c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace

void ulysses_push_out_cuda(const at::Tensor& o, at::IntArrayRef heads, at::TensorList dst,
                           int64_t rank, int64_t L, bool joint_front,
                           std::optional<int64_t> head_offset) {
  push_out_cuda(o, heads, dst, rank, L, joint_front, false, head_offset, "ulysses_push_out");
}

void ulysses_push_out_blocks_cuda(const at::Tensor& o, at::IntArrayRef heads,
                                  at::TensorList dst, int64_t rank, int64_t L) {
  push_out_cuda(o, heads, dst, rank, L, true, true, std::nullopt, "ulysses_push_out_blocks");
}

TORCH_LIBRARY_IMPL(xdit_ops, CUDA, m) {
  m.impl("ulysses_place_gathered", &ulysses_place_gathered_cuda);
  m.impl("ulysses_pack_qkv", &ulysses_pack_qkv_cuda);
  m.impl("ulysses_unpack_out", &ulysses_unpack_out_cuda);
  m.impl("ulysses_push_qkv", &ulysses_push_qkv_cuda);
  m.impl("ulysses_push_out", &ulysses_push_out_cuda);
  m.impl("ulysses_push_out_blocks", &ulysses_push_out_blocks_cuda);
}

}  // namespace xdit_ops
