"""The one ``xdit_ops`` torch library fragment every op schema is defined in."""

from __future__ import annotations

import torch

# FRAGMENT, so that the native modules' TORCH_LIBRARY_IMPL blocks and other Python modules can
# add kernels to the same namespace.
lib = torch.library.Library("xdit_ops", "FRAGMENT")


# (plain_call's torch._C functions bound once: ~0.1 us of attribute lookups a call)
_TENSOR = torch.Tensor
_DISPATCH_STACK_LEN = torch._C._len_torch_dispatch_stack
_FUNCTION_MODE = torch._C._is_torch_function_mode_enabled
_GRAD_ENABLED = torch._C.is_grad_enabled
_FUNCTORCH_WRAPPED = torch._C._functorch.is_functorch_wrapped_tensor


def plain_call(q, k, v) -> bool:
    """A call of an op on (q, k, v) that the dispatcher would send straight to its CUDA kernel
    (plain tensors, no dispatch or function mode, no autograd to record, no functorch
    transform): what an eager fast path may skip the op's dispatch for."""
    return (type(q) is _TENSOR and type(k) is _TENSOR and type(v) is _TENSOR
            and _DISPATCH_STACK_LEN() == 0 and not _FUNCTION_MODE()
            and not (_GRAD_ENABLED() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not _FUNCTORCH_WRAPPED(q))
