"""Launching ``@triton.jit`` kernels with less host time per call.

``kernel[grid](*args, **kwargs)`` binds the arguments, computes Triton's specialization of every
one of them and its cache key, and looks the compiled kernel up, on every call: tens of
microseconds of host time a launch on the GPU machines (run 83: the FP8 op's quantization pass,
three launches, took 250-500 µs of host time at (1,4608,24,128), more than its GPU time). For
eager calls :func:`launch` keeps the compiled kernel of each specialization in a dict of its own,
under a key that separates at least every case Triton specializes on, and launches it directly
(``CompiledKernel[grid](*args, stream=...)``, Triton's launcher for a compiled kernel):

* a tensor by its dtype and whether its address is a multiple of 16 bytes;
* an int by whether it is 1, 0, a multiple of 16, and in int32 range (Triton makes 1 a
  constant, marks multiples of 16, and takes int64 past int32);
* a bool by its value, a float by its type, None as None;
* constexpr keyword arguments and launch options (``num_warps``, ``num_stages``) by value;
* the device (a compiled kernel is loaded on one device's context).

The first launch of a key goes through ``kernel[grid]`` (which compiles, or finds Triton's own
cache) and its result is kept. Any argument of another type, a tensor subclass (fake or
functional tensors under tracing), a launch during torch.compile's tracing, Triton's CPU
interpreter, or ``XDIT_OPS_TRITON_FAST_LAUNCH=0`` take the plain path: ``wrap_triton(kernel)[grid]``
(traceable inside a ``triton_op``) or, in the interpreter, ``kernel[grid]``.
"""

from __future__ import annotations

import inspect
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FAST_ENV = "XDIT_OPS_TRITON_FAST_LAUNCH"

# Launch options of kernel[grid](...) (not kernel parameters); part of the key by value.
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

# (kernel, device, options and constexprs, per-argument classes) -> (CompiledKernel, the
# parameter values after the positional arguments)
_compiled: dict[tuple, tuple[object, tuple]] = {}
# kernel -> (parameter names, defaults by name)
_params: dict[object, tuple[tuple[str, ...], dict[str, object]]] = {}

try:  # what Triton's own driver uses for the current stream
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - older torch
    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


def fast_enabled() -> bool:
    """Whether :func:`launch` may take its cached path (``XDIT_OPS_TRITON_FAST_LAUNCH``, read per
    call: ``1`` (default) or ``0``; anything else is an error naming it)."""
    text = os.environ.get(FAST_ENV, "1")
    if text not in ("0", "1"):
        raise ValueError(f"{FAST_ENV}={text!r}: expected 0 or 1")
    return text == "1" and not INTERPRET


def _arg_class(a):
    """The specialization class of one runtime argument (None: not cacheable)."""
    t = type(a)
    if t is torch.Tensor:
        return (a.dtype, a.data_ptr() % 16 == 0)
    if t is bool:
        return ("b", a)
    if t is int:
        return ("i", a == 1, a == 0, a % 16 == 0, _INT32_MIN <= a <= _INT32_MAX)
    if t is float:
        return "f"
    if a is None:
        return "n"
    return None


def _parameters(kernel) -> tuple[tuple[str, ...], dict[str, object]]:
    got = _params.get(kernel)
    if got is None:
        sig = inspect.signature(kernel.fn)
        names = tuple(sig.parameters)
        defaults = {n: p.default for n, p in sig.parameters.items()
                    if p.default is not inspect.Parameter.empty}
        got = _params[kernel] = (names, defaults)
    return got


def launch_key(kernel, device_index: int, args: tuple, kwargs: dict) -> tuple | None:
    """The cache key of one launch, or None when an argument is of a type the key does not
    cover (then :func:`launch` takes the plain path)."""
    classes = []
    for a in args:
        c = _arg_class(a)
        if c is None:
            return None
        classes.append(c)
    return (kernel, device_index, tuple(sorted(kwargs.items())), tuple(classes))


def _tail(kernel, num_args: int, kwargs: dict) -> tuple:
    """The values of the kernel parameters after the ``num_args`` positional ones, in signature
    order (a compiled kernel's launcher takes every parameter, constexprs included): keyword
    constexprs, else defaults."""
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


def _plain(kernel, grid, args, kwargs):
    """Triton's own launch. Through ``wrap_triton`` only when traced: outside a ``triton_op``'s
    eager body (which turns it off), an untraced ``wrap_triton`` launch goes through torch's
    higher-order op, ~250 µs of host time a launch more (run 94)."""
    if INTERPRET or not _traced(args):
        return kernel[grid](*args, **kwargs)
    from torch.library import wrap_triton

    return wrap_triton(kernel)[grid](*args, **kwargs)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on the current CUDA device, which must be the device of
    the tensor arguments (the callers enter it). Runtime arguments are positional; constexprs
    and launch options are keywords."""
    if not fast_enabled() or torch.compiler.is_compiling():
        _plain(kernel, grid, args, kwargs)
        return
    dev = next((a.device for a in args if type(a) is torch.Tensor), None)
    key = None if dev is None or dev.type != "cuda" else launch_key(kernel, dev.index, args,
                                                                    kwargs)
    if key is None:
        _plain(kernel, grid, args, kwargs)
        return
    hit = _compiled.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None:  # a Triton whose launch returns its compiled kernel
            params = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
            _compiled[key] = (compiled, _tail(kernel, len(args), params))
        return
    compiled, tail = hit
    g = tuple(grid) + (1,) * (3 - len(grid))
    compiled[g](*args, *tail, stream=_raw_stream(dev.index))
