"""subspaces: low-rank and subspace methods of deep learning — adapt, train, compress, merge, measure.

The public API is small; importing it does not import transformers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from ._errors import SubspacesError
from ._registry import list_methods
from ._targets import inspect_targets
from .adapters._core import (
    adapt_,
    adapter_parameters,
    adapters_disabled,
    fold_,
    truncate_,
    unadapt_,
)
from .adapters._saving import load_adapter, save_adapter
from .compress._core import compress_
from .integrations.peft import export_lora
from .merge._stream import merge_stream

_LAZY = ("adapters", "optim", "compress", "merge", "nn", "linalg", "measure", "models", "data", "integrations")

__all__ = [
    "SubspacesError",
    "adapt_",
    "adapter_parameters",
    "adapters_disabled",
    "compress_",
    "export_lora",
    "fold_",
    "inspect_targets",
    "list_methods",
    "load_adapter",
    "merge_stream",
    "save_adapter",
    "truncate_",
    "unadapt_",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'subspaces' has no attribute {name!r}")
