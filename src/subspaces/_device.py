"""Device and dtype arguments: a clear error for a device this machine cannot use or a dtype name we do not know,
instead of a torch traceback later. Shared by every recipe and the merge core."""
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


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(dtype: str | torch.dtype | None, allowed: tuple[str, ...] | None = None) -> torch.dtype | None:
    """A torch dtype from its name (``"bf16"``, ``"float32"``, ...) or itself; None stays None. ``allowed``
    narrows the names a caller accepts."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {k: v for k, v in DTYPE_NAMES.items() if allowed is None or k in allowed}
    if dtype not in names:
        raise SubspacesError(f"dtype={dtype!r}; allowed: {', '.join(names)}")
    return names[dtype]
