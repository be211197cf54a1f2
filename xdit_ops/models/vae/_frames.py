"""CUDA graphs of a causal video decoder's per-frame step (Wan 2.1/2.2, Qwen-Image).

These VAEs decode a video one latent frame at a time: ``decoder(x[:, :, i:i+1], feat_cache=...,
feat_idx=...)`` runs every layer on one frame and leaves, in ``feat_cache``, the last input
frames of each causal convolution for the next call. On row bands a frame step is a few
thousand small kernels (convolutions, halo packs, NCCL sends and receives) whose launch costs
more host time than the GPU spends on them: the banded decode is host-bound.

After the first frames the step is a fixed point of shapes: the same input shape and the same
cache shapes before and after the call. :class:`FrameGraphs` notices that (a call whose cache
signature is unchanged by the call), captures the next call with that signature into a CUDA
graph whose inputs are static buffers (the frame and one buffer per cache entry) and which ends
by copying the new cache entries into the input buffers, and from then on replays it: one
launch per frame. The halo exchanges (NCCL point-to-point) and the mid-block attention
(``usp_attention`` over NCCL) are captured with the rest; every rank captures at the same frame,
because the signature depends on the frame count only.

A graph is keyed on everything its pointers and shapes depend on: the frame's shape, dtype and
device, the cache signature, the band split, and the address of every decoder parameter (moving
or casting the VAE gives new addresses: a new graph). Only the newest ``max_graphs`` graphs are
kept; ``release()`` frees them.
"""

from __future__ import annotations

import atexit
import functools
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn

from xdit_ops.models.vae._band import active

__all__ = ["FrameGraphs", "frame_graphs_enabled", "release_frame_graphs"]


def frame_graphs_enabled(option: bool | None) -> bool:
    """The ``frame_graphs`` option of ``parallelize_vae``: None reads ``XDIT_OPS_VAE_GRAPHS``
    (on unless it is ``0``; see ``docs/vae.md``)."""
    if option is not None:
        return bool(option)
    value = os.environ.get("XDIT_OPS_VAE_GRAPHS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"parallelize_vae: XDIT_OPS_VAE_GRAPHS must be 0 or 1, got {value!r}")
    return value == "1"


# Teardown. A live CUDA graph that holds NCCL kernels keeps its communicator busy: on 2 H200s,
# destroy_process_group() never returned while a decoded VAE's graphs were alive (both ranks
# had passed every check; run 11). With the guard below, the same test returns (2 H100s, run
# 12). So every FrameGraphs is registered here, and its graphs are
# dropped before a process group is destroyed (destroy_process_group is wrapped once, at the
# first capture), by xdit_ops.destroy_parallel, and at interpreter exit.
_LIVE: weakref.WeakSet = weakref.WeakSet()
_GUARDED = False


def release_frame_graphs() -> None:
    """Drop the per-frame CUDA graphs of every parallelised VAE (they are captured again on the
    next decode). Call it before tearing down the band group's communicator yourself."""
    had = False
    for fg in list(_LIVE):
        had = had or bool(fg.graphs)
        fg.release()
    if had and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the graphs' last replays are done before any teardown


def _guard_teardown() -> None:
    global _GUARDED
    if _GUARDED:
        return
    _GUARDED = True
    original = c10d.destroy_process_group

    @functools.wraps(original)
    def destroy_process_group(*args, **kwargs):
        release_frame_graphs()
        return original(*args, **kwargs)

    c10d.destroy_process_group = destroy_process_group
    dist.destroy_process_group = destroy_process_group
    atexit.register(release_frame_graphs)


def _cache_signature(cache: list) -> tuple:
    """Shapes and dtypes of the tensor entries of the cache; other entries (None for slots the
    decoder never fills, the temporal upsampler's marker string on the first frames) by value."""
    return tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else ("value", t)
                 for t in cache)


Recorder = Callable[[Callable[[], torch.Tensor], object],
                   tuple[Callable[[], None], Callable[[], torch.Tensor], object]]


def cuda_graph_recorder(step: Callable[[], torch.Tensor], pool) -> tuple:
    """Capture ``step()`` in a CUDA graph sharing memory pool ``pool`` (None: a new one).

    Returns ``(replay, output, pool)``: ``replay()`` runs the graph, ``output()`` is the tensor
    the step returned (static: each replay rewrites it), ``pool`` the graph's pool."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph.replay, lambda: out, graph.pool()


class _Graph:
    __slots__ = ("replay", "output", "x", "cache", "idx")

    def __init__(self, replay, output, x, cache, idx):
        self.replay = replay
        self.output = output
        self.x = x
        self.cache = cache
        self.idx = idx


class FrameGraphs:
    """The replacement of ``decoder.forward``: eager outside a band decode, on the CPU, on the
    first chunk and until the step's shapes settle; a CUDA graph replay after that.

    Parameters
    ----------
    decoder : the VAE's decoder module (its parameters key the graphs).
    forward : the decoder's original bound ``forward``.
    max_graphs : graphs kept (least recently used dropped).
    recorder : how a step is recorded (default :func:`cuda_graph_recorder`). The CPU tests pass
        one that re-runs the step at every replay, which checks everything here but the capture
        itself (static buffers, the cache hand-over, when a step is recorded) on gloo.
    device_types : the device types whose decodes are recorded.
    """

    def __init__(self, decoder: nn.Module, forward: Callable, max_graphs: int = 2,
                 recorder: Recorder = cuda_graph_recorder,
                 device_types: tuple[str, ...] = ("cuda",)):
        self.decoder = decoder
        self.recorder = recorder
        self.device_types = device_types
        self.forward = forward
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.steady: set[tuple] = set()
        self.pool = None
        self.enabled = True
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)
        self.replays = 0
        _LIVE.add(self)

    def release(self) -> None:
        """Drop every graph and its memory pool."""
        self.graphs.clear()
        self.steady.clear()
        self.pool = None

    def __call__(self, x, *args, **kwargs):
        ctx = active()
        feat_cache = kwargs.get("feat_cache")
        feat_idx = kwargs.get("feat_idx")
        eager = (ctx is None or not self.enabled or x.device.type not in self.device_types or args
                 or feat_cache is None or feat_idx is None or kwargs.get("first_chunk")
                 or set(kwargs) - {"feat_cache", "feat_idx", "first_chunk"}
                 or (x.is_cuda and torch.cuda.is_current_stream_capturing()))
        if eager:
            return self.forward(x, *args, **kwargs)
        sig = _cache_signature(feat_cache)
        key = (tuple(x.shape), x.dtype, x.device, feat_idx[0], sig, id(ctx.group), ctx.base,
               tuple(p.data_ptr() for p in self.decoder.parameters()))
        entry = self.graphs.get(key)
        if entry is None and key in self.steady:
            entry = self._capture(key, x, feat_cache, feat_idx)
        if entry is None:
            idx0 = feat_idx[0]
            out = self.forward(x, feat_cache=feat_cache, feat_idx=feat_idx)
            if _cache_signature(feat_cache) == sig and feat_idx[0] > idx0:
                self.steady.add(key)  # the next call with this key is captured
            return out
        self.graphs.move_to_end(key)
        return self._replay(entry, x, feat_cache, feat_idx)

    def _capture(self, key, x, feat_cache, feat_idx) -> _Graph:
        static_x = x.clone()
        # The cache tensors of the last eager step become the graph's input buffers (no copy:
        # a video VAE's cache is hundreds of MB per rank); one that shares memory with another
        # entry or is a view is copied, so every buffer is the graph's own.
        seen: set[int] = set()
        cache = []
        for t in feat_cache:
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if t._base is not None or ptr in seen or not t.is_contiguous():
                    t = t.clone()
                seen.add(t.untyped_storage().data_ptr())
            cache.append(t)
        idx0 = feat_idx[0]
        idx = [idx0]

        def step() -> torch.Tensor:
            work = list(cache)
            idx[0] = idx0
            out = self.forward(static_x, feat_cache=work, feat_idx=idx)
            for buf, new in zip(cache, work, strict=True):
                if isinstance(buf, torch.Tensor) and new is not buf:
                    buf.copy_(new)  # the step's new cache becomes the next step's input
            return out

        _guard_teardown()
        replay, output, self.pool = self.recorder(step, self.pool)
        self.captures += 1
        entry = _Graph(replay, output, static_x, cache, idx)
        self.graphs[key] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return entry

    def _replay(self, e: _Graph, x, feat_cache, feat_idx) -> torch.Tensor:
        e.x.copy_(x)
        for i, (buf, cur) in enumerate(zip(e.cache, feat_cache, strict=True)):
            if isinstance(buf, torch.Tensor) and cur is not buf:
                buf.copy_(cur)
                feat_cache[i] = buf
        e.replay()
        self.replays += 1
        feat_idx[0] = e.idx[0]
        return e.output().clone()
