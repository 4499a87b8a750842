"""Measure: look at spectra and subspaces. Plain functions, each citing its source.

Importing this module imports only torch (no scipy, no transformers).
"""

from subspaces.linalg import principal_angles, subspace_overlap
from subspaces.measure.intrinsic import intrinsic_dimension
from subspaces.measure.spectra import effective_rank, spectrum, stable_rank

__all__ = ["spectrum", "effective_rank", "stable_rank", "principal_angles", "subspace_overlap", "intrinsic_dimension"]
