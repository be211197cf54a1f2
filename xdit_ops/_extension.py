"""Loading of the optional native modules.

``import xdit_ops`` never needs a compiled module: each one is imported if present, and the reason
it is not is kept for ``xdit-ops doctor`` and for error messages.
"""

from __future__ import annotations

import importlib
import os

# The native modules link against libc10/libtorch; importing torch first loads those libraries
# into the process (``import xdit_ops`` before ``import torch`` would otherwise fail to load _C).
import torch  # noqa: F401

_MODULES = ("_C", "_C_sm90")
_loaded: dict[str, object] = {}
_reasons: dict[str, str] = {}


def _load(name: str) -> None:
    if os.environ.get("XDIT_OPS_DISABLE_EXTENSION") == "1":
        _reasons[name] = "disabled by XDIT_OPS_DISABLE_EXTENSION=1"
        return
    try:
        _loaded[name] = importlib.import_module(f"xdit_ops.{name}")
    except ImportError as exc:  # not built, or built against another torch
        _reasons[name] = f"not importable: {exc}"


def load_all() -> None:
    for name in _MODULES:
        if name not in _loaded and name not in _reasons:
            _load(name)


def has(name: str = "_C") -> bool:
    """Whether the native module ``xdit_ops.<name>`` is loaded."""
    return name in _loaded


def module(name: str = "_C") -> object | None:
    """The native module ``xdit_ops.<name>`` when it is loaded, else None."""
    return _loaded.get(name)


def reason(name: str = "_C") -> str:
    """Why ``xdit_ops.<name>`` is not loaded ('' when it is)."""
    return _reasons.get(name, "")
