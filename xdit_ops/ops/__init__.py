"""Op families: each module defines its schemas, fake kernels and CPU kernels on import."""

from xdit_ops.ops.attention import attention
from xdit_ops.ops.merge_attention_states import merge_attention_states_

__all__ = ["attention", "merge_attention_states_"]
