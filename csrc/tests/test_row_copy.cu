// Standalone unit test of the batched row copy (no torch), run the way graph_call runs it: one
// kernel node of an instantiated CUDA graph whose parameters are set per case with
// cudaGraphExecKernelNodeSetParams (the node's grid fixed). The kernel against a host loop, byte
// for byte, over every access width (16, 8, 4, 2, 1 bytes: addresses, pitches and row sizes
// chosen to allow exactly that width), one to four segments in one launch, source pitches
// wider than the row (a fused projection's view), one long row (a contiguous tensor), and a
// check that nothing outside each destination's rows is written. Exit code: see test_common.h.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "test_common.h"
#include "xdit_ops/row_copy.h"

namespace {

// The graph of one row-copy node (grid 264 x kRowCopyMaxSegments, as registered), its node and
// executable.
struct Node {
  cudaGraph_t graph = nullptr;
  cudaGraphNode_t node = nullptr;
  cudaGraphExec_t exec = nullptr;
};
constexpr unsigned kGridX = 264;

struct Seg {
  int64_t rows, row_bytes, src_pitch, dst_pitch, src_offset, dst_offset;
};

int run_case(const Node& g, const char* name, const std::vector<Seg>& segs, int want_vec) {
  std::mt19937 rng(7);
  xdit_ops::RowCopyParams p{};
  p.num_segments = static_cast<int>(segs.size());
  std::vector<std::vector<unsigned char>> srcs, dsts;
  std::vector<unsigned char*> src_dev, dst_dev;
  for (size_t i = 0; i < segs.size(); ++i) {
    const Seg& s = segs[i];
    const int64_t src_bytes = s.src_offset + s.rows * s.src_pitch;
    const int64_t dst_bytes = s.dst_offset + s.rows * s.dst_pitch + 64;
    std::vector<unsigned char> a(src_bytes), b(dst_bytes, 0xAB);
    for (auto& x : a) x = static_cast<unsigned char>(rng());
    unsigned char *da = nullptr, *db = nullptr;
    CHECK_CUDA(cudaMalloc(&da, src_bytes));
    CHECK_CUDA(cudaMalloc(&db, dst_bytes));
    CHECK_CUDA(cudaMemcpy(da, a.data(), src_bytes, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(db, b.data(), dst_bytes, cudaMemcpyHostToDevice));
    p.seg[i] = {db + s.dst_offset, da + s.src_offset, s.rows, s.row_bytes, s.dst_pitch,
                s.src_pitch};
    srcs.push_back(a);
    dsts.push_back(b);
    src_dev.push_back(da);
    dst_dev.push_back(db);
  }
  const int vec = xdit_ops::row_copy_vector_bytes(p.seg[0]);
  xdit_ops::RowCopyLaunch launch;
  launch.params = p;
  CHECK_CUDA(xdit_ops::row_copy_prepare(launch, kGridX, xdit_ops::kRowCopyMaxSegments));
  CHECK_CUDA(cudaGraphExecKernelNodeSetParams(g.exec, g.node, &launch.node));
  CHECK_CUDA(cudaGraphLaunch(g.exec, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  int64_t bad = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    const Seg& s = segs[i];
    std::vector<unsigned char> want = dsts[i], got(want.size());
    for (int64_t r = 0; r < s.rows; ++r) {
      for (int64_t c = 0; c < s.row_bytes; ++c) {
        want[s.dst_offset + r * s.dst_pitch + c] = srcs[i][s.src_offset + r * s.src_pitch + c];
      }
    }
    CHECK_CUDA(cudaMemcpy(got.data(), dst_dev[i], got.size(), cudaMemcpyDeviceToHost));
    for (size_t j = 0; j < got.size(); ++j) bad += got[j] != want[j];
    CHECK_CUDA(cudaFree(src_dev[i]));
    CHECK_CUDA(cudaFree(dst_dev[i]));
  }
  const bool ok = bad == 0 && vec == want_vec;
  std::printf("%-26s vec %2d B (want %2d): %s (%lld bad bytes)\n", name, vec, want_vec,
              ok ? "ok" : "FAIL", static_cast<long long>(bad));
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  if (xdit_test::device_sm_count("test_row_copy") == 0) return xdit_test::kSkipped;
  int failures = 0;
  // the node as graph_call registers it: no segments yet (it copies nothing)
  Node g;
  xdit_ops::RowCopyLaunch empty;
  empty.params = {};
  CHECK_CUDA(xdit_ops::row_copy_prepare(empty, kGridX, xdit_ops::kRowCopyMaxSegments));
  CHECK_CUDA(cudaGraphCreate(&g.graph, 0));
  CHECK_CUDA(cudaGraphAddKernelNode(&g.node, g.graph, nullptr, 0, &empty.node));
  CHECK_CUDA(cudaGraphInstantiate(&g.exec, g.graph, 0));
  CHECK_CUDA(cudaGraphLaunch(g.exec, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  // rows, row bytes, src pitch, dst pitch, src offset, dst offset
  failures += run_case(g, "contiguous one row", {{1, 7 << 20, 7 << 20, 7 << 20, 0, 0}}, 16);
  failures += run_case(g, "qkv view, 3 segments",
                       {{300, 6144, 3 * 6144, 6144, 0, 0}, {300, 6144, 3 * 6144, 6144, 6144, 0},
                        {300, 6144, 3 * 6144, 6144, 2 * 6144, 0}}, 16);
  failures += run_case(g, "4 segments, mixed", {{5, 24, 40, 24, 8, 0}, {1, 8, 8, 8, 0, 0},
                                             {9, 6, 10, 6, 2, 4}, {3, 13, 13, 13, 1, 3}}, 8);
  failures += run_case(g, "width 4", {{17, 12, 20, 12, 4, 0}}, 4);
  failures += run_case(g, "width 2", {{17, 74, 74, 74, 2, 0}}, 2);
  failures += run_case(g, "width 1", {{6, 13, 16, 13, 1, 0}}, 1);
  failures += run_case(g, "many rows, grid-stride", {{40000, 96, 160, 96, 32, 0}}, 16);
  CHECK_CUDA(cudaGraphExecDestroy(g.exec));
  CHECK_CUDA(cudaGraphDestroy(g.graph));
  return xdit_test::finish("test_row_copy", failures);
}
