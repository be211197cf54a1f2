"""xdit_ops: kernel-first parallel inference ops for diffusion transformers.

Tensors are BSHD (batch, sequence, heads, head_dim) at the API unless stated. Importing the
package defines every op's schema, fake kernel and CPU kernel; the CUDA kernels come from the
optional native modules (``xdit_ops._C``, ``xdit_ops._C_sm90``) when they were built.
"""

from xdit_ops import _extension

_extension.load_all()

from xdit_ops.models.vae import parallelize_vae  # noqa: E402
from xdit_ops.ops import attention, merge_attention_states_, usp_attention  # noqa: E402
from xdit_ops.ops.fp8_attention import fp8_attention  # noqa: E402
from xdit_ops.ops.merge_attention_states import merge_attention_partials  # noqa: E402
from xdit_ops.ops.merge_attention_states import register_cuda_fallback as _merge_fallback  # noqa: E402
from xdit_ops.parallel import (  # noqa: E402
    ParallelState,
    destroy_parallel,
    get_parallel_state,
    init_parallel,
)
from xdit_ops.parallel.sequence import gather_sequence, shard_sequence  # noqa: E402

_merge_fallback()

__version__ = "0.1.0"

__all__ = [
    "ParallelState",
    "attention",
    "destroy_parallel",
    "fp8_attention",
    "get_parallel_state",
    "init_parallel",
    "gather_sequence",
    "merge_attention_partials",
    "merge_attention_states_",
    "parallelize_vae",
    "shard_sequence",
    "usp_attention",
]
