"""Launching ``@triton.jit`` kernels from the launchers, and recording the launches of one call
so that an op can replay them later with less host time.

:func:`launch` is ``kernel[grid](*args, **kwargs)``, through ``wrap_triton`` only where the
launch is traced (torch.compile, fake or functional tensors): outside a ``triton_op``'s eager
body an untraced ``wrap_triton`` launch goes through torch's higher-order op, ~250 µs of host
time a launch more (run 94).

Under :func:`recording` every launch (and every buffer that :func:`note_alloc` is told of) is
appended to a log: the compiled kernel Triton chose for the arguments (``kernel[grid]`` returns
it), the grid, the arguments, and the values of the parameters after the positional ones in
signature order (what a compiled kernel's launcher takes). An op that keys its calls by
everything that decides those arguments (shapes, strides, dtypes, pointer alignment, settings)
can then launch the same compiled kernels for a later call of the same key with that call's
tensors (:class:`Replay`): no binding, no specialization, no cache lookup, no Python of the
launchers (``xdit_ops::fp8_attention``'s fast path).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from typing import NamedTuple

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Launch options of kernel[grid](...), not kernel parameters.
_OPTIONS = frozenset(("num_warps", "num_stages", "num_ctas", "maxnreg"))

# kernel -> (parameter names, defaults by name)
_params: dict[object, tuple[tuple[str, ...], dict[str, object]]] = {}
_rec = threading.local()

try:  # what Triton's own driver uses for the current stream
    raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - older torch
    def raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


class Launch(NamedTuple):
    """One recorded launch: the compiled kernel, the grid (3 dimensions), the positional
    arguments as launched and the later parameters' values (constexprs, defaults)."""
    compiled: object
    grid: tuple[int, int, int]
    args: tuple
    tail: tuple


class Alloc(NamedTuple):
    """One recorded allocation: the (shape, dtype) specs and the tensors made for them."""
    specs: tuple
    tensors: tuple


def _parameters(kernel) -> tuple[tuple[str, ...], dict[str, object]]:
    got = _params.get(kernel)
    if got is None:
        sig = inspect.signature(kernel.fn)
        defaults = {n: p.default for n, p in sig.parameters.items()
                    if p.default is not inspect.Parameter.empty}
        got = _params[kernel] = (tuple(sig.parameters), defaults)
    return got


def tail_values(kernel, num_args: int, kwargs: dict) -> tuple:
    """The values of the kernel parameters after the ``num_args`` positional ones, in signature
    order: keyword constexprs, else defaults (launch options are not parameters)."""
    names, defaults = _parameters(kernel)
    out = []
    for name in names[num_args:]:
        if name in kwargs:
            out.append(kwargs[name])
        elif name in defaults:
            out.append(defaults[name])
        else:
            raise TypeError(f"launch: {getattr(kernel, '__name__', kernel)} misses argument "
                            f"{name!r}")
    return tuple(out)


def _traced(args: tuple) -> bool:
    """Whether this launch is being traced (torch.compile, or a tensor subclass: fake or
    functional tensors)."""
    return torch.compiler.is_compiling() or any(
        isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args)


def _log() -> list | None:
    return getattr(_rec, "log", None)


@contextlib.contextmanager
def recording():
    """Record this thread's launches and noted allocations into the yielded list (entries
    :class:`Launch`, :class:`Alloc`, or None for a launch that cannot be replayed)."""
    prev = _log()
    _rec.log = log = []
    try:
        yield log
    finally:
        _rec.log = prev


def note_alloc(specs: tuple, tensors: list) -> None:
    """Tell a recording of tensors made for ``specs`` (the replay makes them again)."""
    log = _log()
    if log is not None:
        log.append(Alloc(specs, tuple(tensors)))


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on the current CUDA device (which must be the tensor
    arguments' device: the callers enter it). Runtime arguments are positional; constexprs and
    launch options are keywords."""
    traced = not INTERPRET and _traced(args)
    if traced:
        from torch.library import wrap_triton

        wrap_triton(kernel)[grid](*args, **kwargs)
        compiled = None
    else:
        compiled = kernel[grid](*args, **kwargs)
    log = _log()
    if log is not None:
        if compiled is None or INTERPRET:  # nothing a replay could launch
            log.append(None)
        else:
            params = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
            g = tuple(grid) + (1,) * (3 - len(grid))
            log.append(Launch(compiled, g, args, tail_values(kernel, len(args), params)))


class Replay:
    """The recorded launches of one call, replayed with another call's tensors.

    ``sources``: the call's tensors that launches may take (the op's inputs, in a fixed order);
    ``constants``: tensors that are the same object in every call of the key (a cached matrix,
    an empty dtype carrier); the one recorded :class:`Alloc` is made again per call. Any other
    tensor argument, a launch that cannot be replayed, or not exactly one allocation: no replay
    (:meth:`build` returns None)."""

    __slots__ = ("specs", "device", "launches", "outputs")

    def __init__(self, specs, device, launches, outputs):
        self.specs = specs
        self.device = device
        self.launches = launches  # (runner, template list, ((position, source, index), ...))
        self.outputs = outputs

    @staticmethod
    def _where(t, sources, made, constants):
        for i, x in enumerate(sources):
            if t is x:
                return (0, i)
        for i, x in enumerate(made):
            if t is x:
                return (1, i)
        if any(t is c for c in constants):
            return ()
        return None

    @classmethod
    def build(cls, log: list, sources: tuple, constants: tuple, outputs: tuple,
              device: torch.device) -> Replay | None:
        """A replay of ``log`` (from :func:`recording`), or None when it cannot be replayed.
        ``outputs``: tensors the replay returns (each one of the allocation's)."""
        allocs = [e for e in log if isinstance(e, Alloc)]
        if len(allocs) != 1 or any(e is None for e in log):
            return None
        made = allocs[0].tensors
        launches = []
        for e in log:
            if not isinstance(e, Launch):
                continue
            dyn = []
            for pos, a in enumerate(e.args):
                if isinstance(a, torch.Tensor):
                    w = cls._where(a, sources, made, constants)
                    if w is None:
                        return None
                    if w:
                        dyn.append((pos, *w))
            template = list(e.args) + list(e.tail)
            for pos, _, _ in dyn:
                template[pos] = None  # no tensor of the recorded call is kept alive
            launches.append((e.compiled[e.grid], template, tuple(dyn)))
        out_idx = []
        for t in outputs:
            w = cls._where(t, (), made, ())
            if not w:
                return None
            out_idx.append(w[1])
        return cls(allocs[0].specs, device, tuple(launches), tuple(out_idx))

    def run(self, sources: tuple, alloc) -> tuple:
        """Launch the recorded kernels with ``sources`` and tensors made by ``alloc(specs,
        device)`` on the current stream; returns the outputs (tensors of that allocation)."""
        made = alloc(self.specs, self.device)
        both = (sources, made)
        stream = raw_stream(self.device.index)
        for runner, template, dyn in self.launches:
            a = template.copy()
            for pos, s, i in dyn:
                a[pos] = both[s][i]
            runner(*a, stream=stream)
        return tuple(made[i] for i in self.outputs)
