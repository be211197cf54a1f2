"""Model-agnostic drop-ins, one layer above the ops."""

from xdit_ops.models.vae import parallelize_vae

__all__ = ["parallelize_vae"]
