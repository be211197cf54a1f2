// The eager fast path's native half: one eager usp_attention call replayed from its own CUDA
// graph in one host call, as plain CPython functions of xdit_ops._C (no dispatcher, no list of
// tensors converted per call). A call graph is registered once (its static inputs, outputs and
// cudaGraphExec_t, held here by handle); graph_call_run(handle, n_out, *srcs) copies the
// call's tensors into the static inputs, launches the graph on the current stream and returns
// fresh copies of the outputs: what the Python replay does with _foreach_copy_,
// CUDAGraph.replay() (a Python method with hooks) and clone(). Contiguous sources, and rows of
// whole heads at one pitch (a view of a fused QKV projection), are copied by one row-copy
// kernel launch (xdit_ops/row_copy.h) before the graph and one after it for the outputs;
// anything else, and a host source (joint_lengths), with Tensor::copy_. Errors are set as
// Python exceptions; no C++ exception crosses into Python (one that did segfaulted the GPU
// machines' processes: runs 7, 31 and 51).
#include <Python.h>

#include <cstdint>
#include <memory>
#include <unordered_map>
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

void flush(RowCopyParams& batch, cudaStream_t stream);

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

// Adds "dst <- src" to `batch` when the row copy can do it (src on dst's device, contiguous or
// rows of whole heads at one pitch, dst contiguous); launches `batch` first when it is full.
// Returns false when it cannot: the caller copies with Tensor::copy_.
bool add_copy(RowCopyParams& batch, const at::Tensor& dst, const at::Tensor& src,
              cudaStream_t stream) {
  if (!src.is_cuda() || src.device() != dst.device() || !dst.is_contiguous()) return false;
  RowCopySegment seg{dst.data_ptr(), src.data_ptr(), 1, static_cast<int64_t>(src.nbytes()), 0, 0};
  if (!src.is_contiguous()) {
    const Rows r = uniform_rows(src);
    if (r.rows == 0) return false;
    seg = {dst.data_ptr(), src.data_ptr(), r.rows, r.row_bytes, r.row_bytes, r.pitch};
  }
  if (seg.rows * seg.row_bytes == 0) return true;
  if (batch.num_segments == kRowCopyMaxSegments) flush(batch, stream);
  batch.seg[batch.num_segments++] = seg;
  return true;
}

void flush(RowCopyParams& batch, cudaStream_t stream) {
  if (batch.num_segments == 0) return;
  XDIT_CUDA_CHECK(launch_row_copy(batch, stream));
  batch.num_segments = 0;
}

}  // namespace

struct EventDeleter {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};

// A registered call graph: its static inputs and outputs, its cudaGraphExec_t, and the stream
// of its last replay. A replay on another stream first waits for everything queued on that
// stream so far (an event recorded there now): the static inputs and outputs are shared by
// every replay, so a call on stream B must not overwrite them while a call queued on stream A
// has not run yet. Nothing is recorded while the stream stays the same (the common case).
struct Registered {
  std::vector<at::Tensor> statics, outs;
  cudaGraphExec_t exec = nullptr;
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
  RowCopyParams batch{};
  for (size_t i = 0; i < n; ++i) {
    if (!add_copy(batch, statics[i], *srcs[i], stream)) statics[i].copy_(*srcs[i]);
  }
  flush(batch, stream);
  XDIT_CUDA_CHECK(cudaGraphLaunch(e.exec, stream));
  result.reserve(n_out);
  for (size_t i = 0; i < n_out; ++i) {
    const at::Tensor& o = outs[i];
    at::Tensor c = at::empty(o.sizes(), o.options());
    if (!add_copy(batch, c, o, stream)) c.copy_(o);
    result.push_back(std::move(c));
  }
  flush(batch, stream);
  return true;
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

// graph_call_register(statics: list, outs: list, graph_exec: int) -> int (a handle > 0)
PyObject* py_register(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "graph_call_register(statics, outs, graph_exec)");
    return nullptr;
  }
  Registered e;
  if (!unpack_list(args[0], e.statics, "statics") || !unpack_list(args[1], e.outs, "outs")) {
    return nullptr;
  }
  const long long ex = PyLong_AsLongLong(args[2]);
  if (ex == -1 && PyErr_Occurred()) return nullptr;
  if (ex == 0 || e.statics.empty() || !e.statics[0].is_cuda()) {
    PyErr_SetString(PyExc_ValueError, "graph_call_register: needs an instantiated graph and "
                    "at least one CUDA static input");
    return nullptr;
  }
  for (const at::Tensor& t : e.statics) {
    if (t.device() != e.statics[0].device() || !t.is_contiguous()) {
      PyErr_SetString(PyExc_ValueError, "graph_call_register: the static inputs must be "
                      "contiguous on one device");
      return nullptr;
    }
  }
  e.exec = reinterpret_cast<cudaGraphExec_t>(static_cast<intptr_t>(ex));
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

// graph_call_run(handle: int, n_out: int, *srcs) -> tuple of n_out tensors, or None while the
// current stream is being captured. srcs: one tensor per static input, shapes and dtypes as
// registered (checked: a mismatch is a ValueError, never a copy of the wrong size).
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
  const at::Tensor* srcs[kRowCopyMaxSegments * 2];
  if (n > kRowCopyMaxSegments * 2) {
    PyErr_SetString(PyExc_ValueError, "graph_call_run: too many inputs");
    return nullptr;
  }
  for (size_t i = 0; i < n; ++i) {
    PyObject* item = args[2 + i];
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "graph_call_run: input %zu is not a tensor", i);
      return nullptr;
    }
    srcs[i] = &THPVariable_Unpack(item);
    if (srcs[i]->sizes() != e.statics[i].sizes() ||
        srcs[i]->scalar_type() != e.statics[i].scalar_type()) {
      PyErr_Format(PyExc_ValueError, "graph_call_run: input %zu does not match the graph's "
                   "static input (shape or dtype)", i);
      return nullptr;
    }
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
     METH_FASTCALL, "Register a call graph (statics, outs, graph_exec) -> handle."},
    {"graph_call_release", py_release, METH_O, "Forget a registered call graph."},
    {"graph_call_run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_run)),
     METH_FASTCALL, "Replay a registered call graph: (handle, n_out, *srcs) -> outputs."},
    {nullptr, nullptr, 0, nullptr},
};

PyMethodDef* graph_call_methods() { return kGraphCallMethods; }

}  // namespace xdit_ops
