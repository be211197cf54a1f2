"""Plain-PyTorch fp32 references: the CPU implementations, the test oracles, the baselines."""

from xdit_ops.reference.attention import attention_ref, merge_attention_states_ref

__all__ = ["attention_ref", "merge_attention_states_ref"]
