"""Adapters: fine-tune a few parameters in a subspace, fold them back. One file per method."""
from ._core import AdapterConfig, Delta
from .lora import LoRA

__all__ = ["AdapterConfig", "Delta", "LoRA"]
