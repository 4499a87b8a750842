"""merge: combine fine-tuned models and adapters.

``ss.merge(method, base=..., models=[...], out=...)`` is the entry point (``_core.merge``; this package is callable
so that ``ss.merge(...)`` and ``ss.merge.<name>`` both work). ``_io`` reads safetensors lazily and writes sharded
Hugging Face folders atomically. One file per method, registered in ``MERGE``; each registered object has a ``kind``:
"tensor" (pure per-tensor rule), "learned", "stream", "lora" or "inference".
"""
from __future__ import annotations

import sys
import types

from .._device import parse_dtype
from ._core import merge, schema
from ._io import load_state_dict, open_model
from ._shards import write_model
from ._learned_inputs import task_vectors
from ._stream import StreamStep, merge_stream
from .adamerging import adamerging
from .atlas import atlas
from .breadcrumbs import breadcrumbs
from .concrete import concrete
from .continual_ta import ContinualTA
from .dare_linear import dare_linear
from .dare_ties import dare_ties
from .extract_lora import extract_lora
from .linear import linear
from .logit_fusion import LogitFusion, fuse_logits, fusion_weights
from .lora_cat import lora_cat
from .lora_lego import lora_lego
from .lora_svd import lora_svd
from .model_stock import model_stock
from .opcm import OPCM
from .task_arithmetic import task_arithmetic
from .ties import ties

__all__ = [
    "ContinualTA",
    "LogitFusion",
    "OPCM",
    "StreamStep",
    "adamerging",
    "atlas",
    "breadcrumbs",
    "concrete",
    "dare_linear",
    "dare_ties",
    "extract_lora",
    "fuse_logits",
    "fusion_weights",
    "linear",
    "lora_cat",
    "lora_lego",
    "lora_svd",
    "load_state_dict",
    "merge",
    "merge_stream",
    "model_stock",
    "open_model",
    "parse_dtype",
    "schema",
    "task_arithmetic",
    "task_vectors",
    "ties",
    "write_model",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
