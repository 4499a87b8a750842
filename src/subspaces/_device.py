"""Device arguments: a clear error for a device this machine cannot use, instead of a torch traceback later."""
from __future__ import annotations

import torch

from ._errors import SubspacesError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked by allocating on it; None: CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise SubspacesError(f"device={str(device)!r} is not usable here ({str(e).splitlines()[0]})") from None
    return device
