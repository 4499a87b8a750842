"""Compressed models as Hugging Face folders.

``save_compressed(model, folder)`` writes the usual ``config.json`` + safetensors weights (``save_pretrained``) and
``compression.json``: for every replaced module its class and constructor arguments (and the compression report).
``load_compressed(folder)`` builds the architecture from ``config.json``, puts the same module classes in place,
and loads the weights strictly, so the logits equal the saved model's. Only safetensors and JSON are read.

A module class is saveable when it is listed in ``MODULES`` with a function giving its constructor keywords;
methods that build their own modules add them with ``register_module``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import SubspacesError
from .._io import atomic_folder, read_json
from ..nn import LowRankLinear

FORMAT = "subspaces-compressed"
MODULES: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict[str, Any]]]] = {}


def register_module(cls: type[nn.Module], spec: Callable[[nn.Module], dict[str, Any]]) -> None:
    """Make ``cls`` saveable: ``spec(module)`` gives the keywords that ``cls(**spec)`` is rebuilt with."""
    MODULES[cls.__name__] = (cls, spec)


register_module(LowRankLinear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                          "rank": m.rank, "bias": m.up.bias is not None})


def _replaced(model: nn.Module) -> dict[str, dict[str, Any]]:
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ in MODULES and MODULES[type(module).__name__][0] is type(module):
            if any(name.startswith(n + ".") for n in found):
                continue  # nested inside an already listed module
            found[name] = {"class": type(module).__name__, **MODULES[type(module).__name__][1](module)}
    return found


def save_compressed(model: nn.Module, folder: str | os.PathLike, *, tokenizer: Any = None,
                    report: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a compressed ``PreTrainedModel``) to a new folder, atomically; returns the folder."""
    folder = Path(folder)
    if folder.exists():
        raise SubspacesError(f"output {folder} already exists; choose a new folder (nothing is overwritten)")
    if not hasattr(model, "save_pretrained"):
        raise SubspacesError("save_compressed needs a Hugging Face PreTrainedModel (with save_pretrained)")
    _check_saveable(model)
    modules = _replaced(model)
    patches = ["matryoshka_kv"] if any(n.endswith(".matryoshka_kv") for n, _ in model.named_modules()) else []

    def build(tmp: Path) -> None:
        from ..models import _quiet

        with _quiet():  # no shard-writing progress bar
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format": FORMAT, "version": 1, "modules": modules, "patches": patches, "report": report}
        (tmp / "compression.json").write_text(json.dumps(meta, indent=1))

    return atomic_folder(folder, build)


def _check_saveable(model: nn.Module) -> None:
    from ..adapters._core import DELTA

    if any(n.endswith("." + DELTA) for n, _ in model.named_modules()):
        raise SubspacesError("the model carries adapters (e.g. EoRA's compensation of a Linear): fold them first "
                             "(ss.fold_) or save them apart (ss.save_adapter / ss.export_lora) on the saved base")
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == "scatterbrain":
        raise SubspacesError("Scatterbrain swaps attention at run time and has no weights: save the model before "
                             "scatterbrain_ and install it again after loading")


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for f in files:
        if not (folder / f).is_file():
            raise SubspacesError(f"{folder} is missing the weights file {f}")
        state.update(load_file(str(folder / f)))
    return state


def load_compressed(folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model written by ``save_compressed`` (eval mode). ``dtype`` defaults to the saved weights'."""
    folder = Path(folder)
    meta_path = folder / "compression.json"
    if not meta_path.is_file():
        raise SubspacesError(f"{folder} has no compression.json: not a folder written by save_compressed")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise SubspacesError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise SubspacesError(f"{folder}/config.json names no architecture transformers knows ({arch!r})")
    state = _state_dict(folder)
    dtype = dtype or next(t.dtype for t in state.values() if t.is_floating_point())
    model = cls(config)  # random init, overwritten below; non-persistent buffers (rotary frequencies) come from it
    for name, spec in meta["modules"].items():
        spec = dict(spec)
        kind = spec.pop("class")
        if kind not in MODULES:
            raise SubspacesError(f"{meta_path}: module {name!r} has unknown class {kind!r}; known: {sorted(MODULES)}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, MODULES[kind][0](**spec))
    if "matryoshka_kv" in meta.get("patches", []):
        from ._kv_attention import attach, attention_modules

        attach(attention_modules(model))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {id(p) for n, p in model.named_parameters() if n in state}
    untied = [n for n in missing if id(model.get_parameter(n)) not in tied]
    if unexpected or untied:
        raise SubspacesError(f"{folder}: weights do not fit the model (unexpected {unexpected[:5]}, "
                             f"missing {untied[:5]})")
    return model.to(device=device, dtype=dtype).eval()
