"""compress: replace weights by low-rank factors; compensate compression error.

``compress_(model, method, ratio=..., calibration=...)`` is the entry point (``_core``); statistics come from
``_calibrate``; ranks from ``_budget``; ``save_compressed`` / ``load_compressed`` write and read Hugging Face folders.
One file per method, registered in ``COMPRESS``.
"""
from __future__ import annotations

from ._budget import ALLOCATIONS, allocate, useful_rank
from ._calibrate import LayerStats
from ._core import compress_, config_for
from ._saving import load_compressed, save_compressed
from .afm import AFM, afm_embedding
from .asvd import ASVD
from .eora import EoRA, eora_, eora_delta, prune_magnitude_, quantize_rtn_
from .fwsvd import FWSVD, fisher_svd
from .matryoshka_kv import MatryoshkaKV, kv_rate_curve
from .pela import PELA, pela_loss, pela_rank
from .sampling import RowSampler, row_scores, sample_rows, sampling_error
from .scatterbrain import Scatterbrain, attention_error, scatterbrain_, scatterbrain_attention
from .svd import SVD
from .svd_llm import SVDLLM

__all__ = [
    "AFM",
    "ALLOCATIONS",
    "ASVD",
    "EoRA",
    "FWSVD",
    "LayerStats",
    "MatryoshkaKV",
    "PELA",
    "RowSampler",
    "SVD",
    "SVDLLM",
    "Scatterbrain",
    "afm_embedding",
    "allocate",
    "attention_error",
    "compress_",
    "config_for",
    "eora_",
    "eora_delta",
    "fisher_svd",
    "kv_rate_curve",
    "load_compressed",
    "pela_loss",
    "pela_rank",
    "prune_magnitude_",
    "quantize_rtn_",
    "row_scores",
    "sample_rows",
    "sampling_error",
    "save_compressed",
    "scatterbrain_",
    "scatterbrain_attention",
    "useful_rank",
]
