"""Train: low-rank gradient optimizers (GaLore, DCT, random projections), sparse + low-rank and spectral
reparameterizations for pretraining, and constrained continual fine-tuning. One file per method.

``ss.optim.setup_(model, "galore", lr=1e-2, rank=128)`` builds any registered method's optimizer for a model (and
reparameterizes the model first where the method needs it); ``ss.optim.Projected`` runs any torch optimizer on
projected gradients with a projector of your choice.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._errors import SubspacesError
from .._registry import TRAIN
from ._projected import Projected
from ._projector import Projector
from ._state import expected_state_bytes, state_bytes
from .dct import DCT
from .galore import GaLore
from .random import RandomProjector
from .restarts import Restarts, RestartsOptimizer, refactor_, reset_moments_
from .sculpt import Sculpt, layer_retention, next_task_
from .sltrain import SLLinear, SLTrain, sltrain_
from .sst import SST, SSTLinear
from .welore import WeLore, welore_, welore_ranks

__all__ = [
    "DCT", "expected_state_bytes", "GaLore", "layer_retention", "next_task_", "Projected", "Projector",
    "RandomProjector", "refactor_", "reset_moments_", "Restarts", "RestartsOptimizer", "Sculpt", "setup_",
    "SLLinear", "SLTrain", "sltrain_", "SST", "SSTLinear", "state_bytes", "WeLore", "welore_", "welore_ranks",
]


def config_for(method: str | Any, **hyperparameters: Any) -> Any:
    """A registered train method's config from its name and hyperparameters (unknown names are listed)."""
    if not isinstance(method, str):
        if hyperparameters:
            raise SubspacesError("pass hyperparameters either in the config object or as keywords, not both")
        return method
    cls = TRAIN.get(method).obj
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(hyperparameters) - fields)
    if unknown:
        raise SubspacesError(f"{method}: unknown hyperparameter(s) {unknown}; allowed: {sorted(fields)}")
    return cls(**hyperparameters)


def setup_(model: torch.nn.Module, method: str | Any, *, lr: float, weight_decay: float = 0.0,
           **hyperparameters: Any) -> torch.optim.Optimizer:
    """The optimizer of a train method for ``model``; methods that reparameterize (SLTrain, SST, WeLore) change
    ``model`` in place first (hence the trailing underscore). Its ``step()`` does everything the method needs
    (basis refreshes, resampling, restarts), so it drops into any training loop or a Hugging Face ``Trainer``."""
    return config_for(method, **hyperparameters).setup(model, lr=lr, weight_decay=weight_decay)
