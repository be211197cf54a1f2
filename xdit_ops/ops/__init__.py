"""Op families: each module defines its schemas, fake kernels and CPU kernels on import."""

from xdit_ops.ops.attention import attention
from xdit_ops.ops.gather_rows import gather_rows
from xdit_ops.ops.merge_attention_states import merge_attention_states_
from xdit_ops.ops.ulysses_pack import (  # noqa: F401
    ulysses_pack_qkv,
    ulysses_push_out,
    ulysses_push_out_blocks,
    ulysses_push_qkv,
    ulysses_unpack_out,
)
from xdit_ops.ops.usp_attention import usp_attention

__all__ = ["attention", "gather_rows", "merge_attention_states_", "usp_attention"]
