"""The one ``xdit_ops`` torch library fragment every op schema is defined in."""

from __future__ import annotations

import torch

# FRAGMENT, so that the native modules' TORCH_LIBRARY_IMPL blocks and other Python modules can
# add kernels to the same namespace.
lib = torch.library.Library("xdit_ops", "FRAGMENT")
