"""save_adapter / load_adapter: our native format (any method) and PEFT's (LoRA-shaped adapters).

Native: ``subspaces_adapter.json`` (method and config per layer, modules_to_save) beside
``subspaces_adapter.safetensors`` (tensors keyed exactly as in ``model.state_dict()``). Both formats may share
one folder. Files are written atomically; nothing is unpickled.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .._errors import SubspacesError
from .._io import atomic_dir, read_json, read_safetensors, write_json, write_safetensors
from ._core import adapter_state, attach_state

NATIVE_CONFIG = "subspaces_adapter.json"
NATIVE_WEIGHTS = "subspaces_adapter.safetensors"
FORMAT = "subspaces-adapter"
FORMATS = ("native", "peft")


def save_adapter(model: nn.Module, path: str | os.PathLike, format: str = "native") -> Path:
    """Write the model's adapter into the folder ``path``: ``format="native"`` (any method) or ``"peft"``
    (``adapter_model.safetensors`` + ``adapter_config.json`` that ``peft.PeftModel.from_pretrained`` loads)."""
    from ..integrations import peft as peft_format

    if format not in FORMATS:
        raise SubspacesError(f"format={format!r}; allowed: {', '.join(FORMATS)}")
    ours = (NATIVE_CONFIG, NATIVE_WEIGHTS, peft_format.CONFIG, peft_format.WEIGHTS)
    if format == "peft":
        config, tensors, _ = peft_format.to_peft(model)
        with atomic_dir(path, overwrite_ours=ours) as tmp:
            write_safetensors(tmp / peft_format.WEIGHTS, tensors, metadata={"format": "pt"})
            write_json(tmp / peft_format.CONFIG, config)
        return Path(path)
    modules, saved, tensors = adapter_state(model)
    from .. import __version__

    header = {"format": FORMAT, "version": 1, "subspaces": __version__, "modules": modules, "modules_to_save": saved}
    with atomic_dir(path, overwrite_ours=ours) as tmp:
        write_safetensors(tmp / NATIVE_WEIGHTS, tensors, metadata={"format": "pt"})
        write_json(tmp / NATIVE_CONFIG, header)
    return Path(path)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach the adapter saved in folder ``path`` (native or PEFT LoRA format) to ``model``, in place."""
    from ..integrations import peft as peft_format

    path = Path(path)
    if not path.is_dir():
        raise SubspacesError(f"adapter folder {path} does not exist")
    if (path / NATIVE_CONFIG).exists():
        header = read_json(path / NATIVE_CONFIG)
        if header.get("format") != FORMAT or not isinstance(header.get("modules"), dict):
            raise SubspacesError(f"{path / NATIVE_CONFIG} is not a subspaces adapter config")
        tensors = read_safetensors(path / NATIVE_WEIGHTS)
        return attach_state(model, header["modules"], list(header.get("modules_to_save", [])), tensors, str(path))
    if (path / peft_format.CONFIG).exists():
        return peft_format.load_peft(model, path)
    raise SubspacesError(f"{path} holds no adapter: expected {NATIVE_CONFIG} (subspaces) or "
                         f"{peft_format.CONFIG} (PEFT)")
