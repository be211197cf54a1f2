// The eager fast path's native half: one eager usp_attention call replayed from its own CUDA
// graph in one host call, as plain CPython functions of xdit_ops._C (no dispatcher, no list of
// tensors converted per call). A call graph is registered once: graph_call_register adds two
// row-copy kernel nodes to the captured graph (xdit_ops/row_copy.h), one before its roots that
// copies the call's inputs into the static inputs and one after its leaves that copies the
// outputs out, and instantiates it (the graph is torch's, captured with keep_graph=True; the
// executable is ours). graph_call_run(handle, n_out, *srcs) then sets the two nodes' parameters
// to this call's tensors and fresh outputs (cudaGraphExecKernelNodeSetParams: it changes later
// launches only, so replays queued before keep theirs) and launches the graph: one launch a
// call, not three. Contiguous sources, and rows of whole heads at one pitch (a view of a fused
// QKV projection), go through the nodes; anything else, and a host source (joint_lengths), is
// copied with Tensor::copy_ before the launch (its node segment left empty). Errors are set as
// Python exceptions; no C++ exception crosses into Python (one that did segfaulted the GPU
// machines' processes: runs 7, 31 and 51).
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/python_variable.h>

#include "utils.h"
#include "xdit_ops/row_copy.h"

namespace xdit_ops {

namespace {

// The rows of `t` (all dimensions but the last two, flattened) as (rows, row_bytes, pitch) when
// each row's last two dimensions are contiguous and the rows sit at one pitch; rows == 0 when not.
struct Rows {
  int64_t rows = 0, row_bytes = 0, pitch = 0;
};

Rows uniform_rows(const at::Tensor& t) {
  Rows r;
  const int64_t nd = t.dim();
  if (nd < 2 || t.numel() == 0) return r;
  const int64_t h = t.size(nd - 2), d = t.size(nd - 1);
  if ((d > 1 && t.stride(nd - 1) != 1) || (h > 1 && t.stride(nd - 2) != d)) return r;
  // the outer dimensions must flatten to one stride (the row pitch)
  int64_t pitch = -1, expect = -1;
  for (int64_t i = nd - 3; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (pitch < 0) {
      pitch = t.stride(i);
      expect = pitch * t.size(i);
    } else {
      if (t.stride(i) != expect) return r;
      expect *= t.size(i);
    }
  }
  const int64_t elem = t.element_size();
  r.rows = t.numel() / (h * d);
  r.row_bytes = h * d * elem;
  r.pitch = (pitch < 0 ? h * d : pitch) * elem;
  return r;
}

// The segment "dst <- src" when the row copy can do it (src on dst's device, contiguous or rows
// of whole heads at one pitch, dst contiguous): true and `seg` set (empty for an empty tensor).
// False when it cannot (the caller copies with Tensor::copy_; `seg` stays empty).
bool segment_for(const at::Tensor& dst, const at::Tensor& src, RowCopySegment& seg) {
  seg = RowCopySegment{dst.data_ptr(), src.data_ptr(), 0, 0, 0, 0};
  if (!src.is_cuda() || src.device() != dst.device() || !dst.is_contiguous()) return false;
  if (src.is_contiguous()) {
    seg.rows = 1;
    seg.row_bytes = static_cast<int64_t>(src.nbytes());
    return true;
  }
  const Rows r = uniform_rows(src);
  if (r.rows == 0) return false;
  seg.rows = r.rows;
  seg.row_bytes = seg.dst_pitch = r.row_bytes;
  seg.src_pitch = r.pitch;
  return true;
}

}  // namespace

struct EventDeleter {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
struct ExecDeleter {
  void operator()(cudaGraphExec_t e) const { cudaGraphExecDestroy(e); }
};

// A registered call graph: its static inputs and outputs, its executable (ours: destroyed on
// release; one still running is freed when it completes) with the copy-in and copy-out nodes,
// and the stream of its last replay. A replay on another stream first waits for everything
// queued on that stream so far (an event recorded there now): the static inputs and outputs
// are shared by every replay, so a call on stream B must not overwrite them while a call
// queued on stream A has not run yet. Nothing is recorded while the stream stays the same (the
// common case).
struct Registered {
  std::vector<at::Tensor> statics, outs;
  std::unique_ptr<CUgraphExec_st, ExecDeleter> exec;
  cudaGraphNode_t copy_in = nullptr, copy_out = nullptr;
  unsigned grid_in = 1, grid_out = 1;  // the nodes' blocks per segment
  cudaStream_t last = nullptr;
  std::unique_ptr<CUevent_st, EventDeleter> order;
};

// statics[i] <- srcs[i] (the caller checked shapes and dtypes), launch e.exec on the current
// stream of the static inputs' device, return copies of the first n_out outputs. Returns
// false (and does nothing) while the current stream is being captured: the caller then runs
// the call itself, so an outer capture records its kernels rather than a launch of this graph.
bool replay_into(Registered& e, const at::Tensor* const* srcs, size_t n, size_t n_out,
                 std::vector<at::Tensor>& result) {
  const at::Tensor* statics = e.statics.data();
  const at::Tensor* outs = e.outs.data();
  const c10::cuda::CUDAGuard guard(statics[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  XDIT_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status != cudaStreamCaptureStatusNone) return false;
  if (stream != e.last) {
    if (!e.order) {
      cudaEvent_t ev = nullptr;
      XDIT_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
      e.order.reset(ev);
    }
    XDIT_CUDA_CHECK(cudaEventRecord(e.order.get(), e.last));
    XDIT_CUDA_CHECK(cudaStreamWaitEvent(stream, e.order.get(), 0));
    e.last = stream;
  }
  RowCopyLaunch in;
  in.params.num_segments = static_cast<int>(n);
  for (size_t i = 0; i < n; ++i) {
    // a source the node cannot copy is copied here, before the launch (stream order)
    if (!segment_for(statics[i], *srcs[i], in.params.seg[i])) statics[i].copy_(*srcs[i]);
  }
  XDIT_CUDA_CHECK(row_copy_prepare(in, e.grid_in, static_cast<unsigned>(e.statics.size())));
  XDIT_CUDA_CHECK(cudaGraphExecKernelNodeSetParams(e.exec.get(), e.copy_in, &in.node));
  RowCopyLaunch out;
  out.params.num_segments = static_cast<int>(e.outs.size());
  std::vector<bool> by_node(n_out);
  result.reserve(n_out);
  for (size_t i = 0; i < e.outs.size(); ++i) {
    if (i >= n_out) {  // an output not asked for: its segment stays empty
      out.params.seg[i] = RowCopySegment{};
      continue;
    }
    const at::Tensor& o = outs[i];
    result.push_back(at::empty(o.sizes(), o.options()));
    by_node[i] = segment_for(result.back(), o, out.params.seg[i]);
  }
  XDIT_CUDA_CHECK(row_copy_prepare(out, e.grid_out, static_cast<unsigned>(e.outs.size())));
  XDIT_CUDA_CHECK(cudaGraphExecKernelNodeSetParams(e.exec.get(), e.copy_out, &out.node));
  XDIT_CUDA_CHECK(cudaGraphLaunch(e.exec.get(), stream));
  for (size_t i = 0; i < n_out; ++i) {
    if (!by_node[i]) result[i].copy_(outs[i]);
  }
  return true;
}

// Adds the copy-in node before every root of `graph` and the copy-out node after every leaf,
// both copying nothing until a replay sets their parameters; instantiates the graph into e.exec.
void add_copy_nodes(Registered& e, cudaGraph_t graph) {
  size_t n_nodes = 0, n_edges = 0, n_roots = 0;
  XDIT_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &n_nodes));
  std::vector<cudaGraphNode_t> nodes(n_nodes);
  if (n_nodes) XDIT_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &n_nodes));
  XDIT_CUDA_CHECK(cudaGraphGetRootNodes(graph, nullptr, &n_roots));
  std::vector<cudaGraphNode_t> roots(n_roots);
  if (n_roots) XDIT_CUDA_CHECK(cudaGraphGetRootNodes(graph, roots.data(), &n_roots));
  XDIT_CUDA_CHECK(cudaGraphGetEdges(graph, nullptr, nullptr, nullptr, &n_edges));
  std::vector<cudaGraphNode_t> from(n_edges), to(n_edges);
  // (with the edge data: a graph holding programmatic edges, a kernel with PDL, would make
  // the query without it fail as lossy)
  std::vector<cudaGraphEdgeData> edge_data(n_edges);
  if (n_edges) {
    XDIT_CUDA_CHECK(
        cudaGraphGetEdges(graph, from.data(), to.data(), edge_data.data(), &n_edges));
  }
  const std::unordered_set<cudaGraphNode_t> has_dependent(from.begin(), from.end());
  std::vector<cudaGraphNode_t> leaves;
  for (cudaGraphNode_t node : nodes) {
    if (!has_dependent.count(node)) leaves.push_back(node);
  }
  int64_t in_bytes = 0, out_bytes = 0;
  for (const at::Tensor& t : e.statics) in_bytes = std::max<int64_t>(in_bytes, t.nbytes());
  for (const at::Tensor& t : e.outs) out_bytes = std::max<int64_t>(out_bytes, t.nbytes());
  e.grid_in = row_copy_blocks(in_bytes);
  e.grid_out = row_copy_blocks(out_bytes);
  RowCopyLaunch none;
  none.params = RowCopyParams{};
  XDIT_CUDA_CHECK(row_copy_prepare(none, e.grid_in, static_cast<unsigned>(e.statics.size())));
  XDIT_CUDA_CHECK(cudaGraphAddKernelNode(&e.copy_in, graph, nullptr, 0, &none.node));
  for (cudaGraphNode_t root : roots) {
    XDIT_CUDA_CHECK(cudaGraphAddDependencies(graph, &e.copy_in, &root, nullptr, 1));
  }
  if (leaves.empty()) leaves.push_back(e.copy_in);  // an empty graph: copy in, then out
  XDIT_CUDA_CHECK(row_copy_prepare(none, e.grid_out, static_cast<unsigned>(e.outs.size())));
  XDIT_CUDA_CHECK(cudaGraphAddKernelNode(&e.copy_out, graph, leaves.data(), leaves.size(),
                                         &none.node));
  // torch's own flags (CUDAGraph::instantiate): the nodes keep the priorities of the streams
  // they were captured on
  cudaGraphExec_t exec = nullptr;
  XDIT_CUDA_CHECK(cudaGraphInstantiateWithFlags(
      &exec, graph,
      cudaGraphInstantiateFlagAutoFreeOnLaunch | cudaGraphInstantiateFlagUseNodePriority));
  e.exec.reset(exec);
}

// ---------------------------------------------------------------------------------------------
// The eager fast path's entry points: plain CPython functions of xdit_ops._C (no dispatcher,
// no list of tensors converted per call). A call graph is registered once (its static inputs,
// its outputs and its cudaGraphExec_t, held here by handle) and replayed by handle with the
// call's tensors as positional arguments. The GIL is held throughout, so the registry needs no
// lock. Errors are set as Python exceptions without C++ exceptions crossing into Python.

std::unordered_map<int64_t, Registered>& registry() {
  static auto* r = new std::unordered_map<int64_t, Registered>();  // never destroyed at exit
  return *r;
}

bool unpack_list(PyObject* list, std::vector<at::Tensor>& out, const char* what) {
  if (!PyList_Check(list)) {
    PyErr_Format(PyExc_TypeError, "graph_call_register: %s must be a list of tensors", what);
    return false;
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    PyObject* item = PyList_GET_ITEM(list, i);
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "graph_call_register: %s[%zd] is not a tensor", what, i);
      return false;
    }
    out.push_back(THPVariable_Unpack(item));
  }
  return true;
}

// graph_call_register(statics: list, outs: list, graph: int) -> int (a handle > 0). `graph`:
// the cudaGraph_t of a finished capture that is not instantiated yet (torch.cuda.CUDAGraph(
// keep_graph=True) after capture_end: raw_cuda_graph()); the copy nodes are added to it and it
// is instantiated here. The graph object must outlive the registration (it owns the memory the
// graph's kernels use).
PyObject* py_register(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "graph_call_register(statics, outs, graph)");
    return nullptr;
  }
  Registered e;
  if (!unpack_list(args[0], e.statics, "statics") || !unpack_list(args[1], e.outs, "outs")) {
    return nullptr;
  }
  const long long g = PyLong_AsLongLong(args[2]);
  if (g == -1 && PyErr_Occurred()) return nullptr;
  if (g == 0 || e.statics.empty() || e.outs.empty() || !e.statics[0].is_cuda()) {
    PyErr_SetString(PyExc_ValueError, "graph_call_register: needs a captured graph, at least "
                    "one CUDA static input and one output");
    return nullptr;
  }
  if (e.statics.size() > kRowCopyMaxSegments || e.outs.size() > kRowCopyMaxSegments) {
    PyErr_Format(PyExc_ValueError, "graph_call_register: at most %d static inputs and %d "
                 "outputs, got %zu and %zu", kRowCopyMaxSegments, kRowCopyMaxSegments,
                 e.statics.size(), e.outs.size());
    return nullptr;
  }
  for (const at::Tensor& t : e.statics) {
    if (t.device() != e.statics[0].device() || !t.is_contiguous()) {
      PyErr_SetString(PyExc_ValueError, "graph_call_register: the static inputs must be "
                      "contiguous on one device");
      return nullptr;
    }
  }
  for (const at::Tensor& t : e.outs) {
    if (t.device() != e.statics[0].device()) {
      PyErr_SetString(PyExc_ValueError, "graph_call_register: the outputs must be on the "
                      "static inputs' device");
      return nullptr;
    }
  }
  try {
    const c10::cuda::CUDAGuard guard(e.statics[0].device());
    add_copy_nodes(e, reinterpret_cast<cudaGraph_t>(static_cast<intptr_t>(g)));
  } catch (const std::exception& ex) {
    PyErr_Format(PyExc_RuntimeError, "graph_call_register: %s", ex.what());
    return nullptr;
  }
  // the capture's own replay runs on the current stream: later replays are ordered after it
  e.last = c10::cuda::getCurrentCUDAStream(e.statics[0].device().index()).stream();
  static int64_t next = 1;
  const int64_t handle = next++;
  registry().emplace(handle, std::move(e));
  return PyLong_FromLongLong(handle);
}

// graph_call_release(handle: int) -> None (an unknown handle is ignored)
PyObject* py_release(PyObject*, PyObject* arg) {
  const long long handle = PyLong_AsLongLong(arg);
  if (handle == -1 && PyErr_Occurred()) return nullptr;
  registry().erase(handle);
  Py_RETURN_NONE;
}

// graph_call_run(handle: int, n_out: int, *srcs) -> tuple of n_out tensors, or None (nothing
// done: the caller runs the call itself) while the current stream is being captured or when a
// source does not fit its static input the way the call that made the graph did: another shape
// or dtype, a CUDA source on another device, a last dimension that is not unit-stride (a
// tensor of 2 or more dimensions), a host source of more than one dimension (joint_lengths may
// live on the host; Q, K and V may not). srcs: one tensor per static input.
PyObject* py_run(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 3) {
    PyErr_SetString(PyExc_TypeError, "graph_call_run(handle, n_out, *srcs)");
    return nullptr;
  }
  const long long handle = PyLong_AsLongLong(args[0]);
  const long n_out = PyLong_AsLong(args[1]);
  if (PyErr_Occurred()) return nullptr;
  auto it = registry().find(handle);
  if (it == registry().end()) {
    PyErr_Format(PyExc_ValueError, "graph_call_run: no graph registered as %lld", handle);
    return nullptr;
  }
  Registered& e = it->second;
  const size_t n = static_cast<size_t>(nargs - 2);
  if (n != e.statics.size() || n_out < 0 || static_cast<size_t>(n_out) > e.outs.size()) {
    PyErr_Format(PyExc_ValueError, "graph_call_run: %zu inputs and %ld outputs for a graph of "
                 "%zu inputs and %zu outputs", n, n_out, e.statics.size(), e.outs.size());
    return nullptr;
  }
  const at::Tensor* srcs[kRowCopyMaxSegments];  // (n == statics.size() <= kRowCopyMaxSegments)
  for (size_t i = 0; i < n; ++i) {
    PyObject* item = args[2 + i];
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "graph_call_run: input %zu is not a tensor", i);
      return nullptr;
    }
    const at::Tensor& src = THPVariable_Unpack(item);
    const at::Tensor& st = e.statics[i];
    if (src.sizes() != st.sizes() || src.scalar_type() != st.scalar_type() ||
        (src.is_cuda() ? src.device() != st.device() : src.dim() > 1) ||
        (src.dim() >= 2 && src.size(-1) > 1 && src.stride(-1) != 1)) {
      Py_RETURN_NONE;
    }
    srcs[i] = &src;
  }
  std::vector<at::Tensor> result;
  try {
    if (!replay_into(e, srcs, n, static_cast<size_t>(n_out), result)) {
      Py_RETURN_NONE;
    }
  } catch (const std::exception& ex) {
    PyErr_SetString(PyExc_RuntimeError, ex.what());
    return nullptr;
  }
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(result.size()));
  if (tuple == nullptr) return nullptr;
  for (size_t i = 0; i < result.size(); ++i) {
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), THPVariable_Wrap(std::move(result[i])));
  }
  return tuple;
}

PyMethodDef kGraphCallMethods[] = {
    {"graph_call_register", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_register)),
     METH_FASTCALL, "Register a captured call graph (statics, outs, graph) -> handle."},
    {"graph_call_release", py_release, METH_O, "Forget a registered call graph."},
    {"graph_call_run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_run)),
     METH_FASTCALL, "Replay a registered call graph: (handle, n_out, *srcs) -> outputs."},
    {nullptr, nullptr, 0, nullptr},
};

PyMethodDef* graph_call_methods() { return kGraphCallMethods; }

}  // namespace xdit_ops
