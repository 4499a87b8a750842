"""LoRA adapters in and out for the LoRA merges (kind "lora") and ``extract_lora``.

In: a PEFT LoRA folder (``adapter_model.safetensors`` + ``adapter_config.json``), our native folder (method ``lora``
only), a model with a LoRA attached (``ss.adapt_``), or a :class:`PeftLoRA` result (so merges chain). Each becomes
``{module: Factors(A, B, scaling, embedding)}`` in PEFT's layout: A (r, *in), B (out, r, *1), ΔW = s·B A.
Native folders do not record the layer type, so their factors are written back with Linear/Conv keys.
Out: one PEFT LoRA folder, written atomically, every module at scale 1 (the scale is folded into B).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._io import atomic_dir, read_json, read_safetensors, write_json, write_safetensors
from ..integrations.peft import (_UNSUPPORTED, CONFIG, PREFIX, WEIGHTS, _pattern_value, _suffixes, peft_config,
                                 to_peft)
from ._shards import check_new_output

_KEY = re.compile(r"(.+)\.lora_(embedding_)?([AB])(?:\.weight)?")


class Factors(NamedTuple):
    A: Tensor           # (r, d_in) or (r, c_in, *kernel)
    B: Tensor           # (d_out, r) or (c_out, r, *1)
    scaling: float
    embedding: bool = False


class PeftLoRA(NamedTuple):
    """A PEFT LoRA: ``state_dict`` (adapter_model.safetensors keys), ``config`` (adapter_config.json) and a
    per-module ``report`` (rank, relative error, ...)."""
    state_dict: dict[str, Tensor]
    config: dict[str, Any]
    report: list[dict] = []


class LoRASet(NamedTuple):
    modules: dict[str, Factors]
    fan_in_fan_out: bool
    base: str | None  # base_model_name_or_path
    source: str


def _parse_peft(cfg: dict, raw: dict[str, Tensor], source: str) -> LoRASet:
    if cfg.get("peft_type") != "LORA":
        raise SubspacesError(f"{source}: peft_type={cfg.get('peft_type')!r}; only LORA adapters merge")
    for key in (*_UNSUPPORTED, "modules_to_save"):
        if cfg.get(key):
            raise SubspacesError(f"{source}: {key}={cfg[key]!r} cannot be merged as a LoRA")
    if cfg.get("bias", "none") != "none":
        raise SubspacesError(f"{source}: bias={cfg['bias']!r}; only 'none' merges")
    parts: dict[str, dict[str, Tensor]] = {}
    embedding = set()
    for key, value in raw.items():
        m = _KEY.fullmatch(key.removeprefix(PREFIX))
        if m is None:
            raise SubspacesError(f"{source}: tensor {key!r} is not a LoRA factor")
        parts.setdefault(m[1], {})[m[3]] = value
        if m[2]:
            embedding.add(m[1])
    if not parts:
        raise SubspacesError(f"{source} holds no LoRA tensors")
    modules = {}
    for name, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise SubspacesError(f"{source}: module {name!r} lacks lora_A or lora_B")
        r = ab["A"].shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8)))
        modules[name] = Factors(ab["A"], ab["B"], alpha / (math.sqrt(r) if cfg.get("use_rslora") else r),
                                name in embedding)
    return LoRASet(modules, bool(cfg.get("fan_in_fan_out")), cfg.get("base_model_name_or_path"), source)


def _parse_native(path: Path) -> LoRASet:
    from ..adapters._saving import NATIVE_CONFIG, NATIVE_WEIGHTS
    from ..adapters.lora import LoRA

    header, tensors = read_json(path / NATIVE_CONFIG), read_safetensors(path / NATIVE_WEIGHTS)
    if header.get("modules_to_save"):
        raise SubspacesError(f"{path}: modules_to_save={header['modules_to_save']} cannot be merged as a LoRA")
    modules = {}
    for name, spec in sorted((header.get("modules") or {}).items()):
        if not isinstance(spec, dict) or spec.get("method") != "lora":
            method = spec.get("method") if isinstance(spec, dict) else None
            raise SubspacesError(f"{path}: module {name!r} is not a LoRA ({method!r}); convert it "
                                 "with ss.export_lora first")
        t = {k: tensors.get(f"{name}.delta.{k}") for k in ("A", "B", "A0", "B0")}
        if t["A"] is None or t["B"] is None:
            raise SubspacesError(f"{path}: module {name!r} lacks its A or B tensor")
        A, B = t["A"], t["B"]
        if t["A0"] is not None:  # PiSSA moved s·B0 A0 out of W: relative to W, ΔW = s[B, −B0][A; A0]
            A, B = torch.cat([A, t["A0"]]), torch.cat([B, -t["B0"]], dim=1)
        modules[name] = Factors(A, B, LoRA.from_dict(spec["config"]).scaling)
    if not modules:
        raise SubspacesError(f"{path}: the adapter has no modules")
    return LoRASet(modules, False, None, str(path))


def read_lora(x: Any, name: str = "adapter") -> LoRASet:
    """One LoRA from a folder (PEFT or native), an ``nn.Module`` with a LoRA attached, or a ``PeftLoRA``."""
    if isinstance(x, PeftLoRA):
        return _parse_peft(x.config, x.state_dict, f"<in-memory {name}>")
    if isinstance(x, nn.Module):
        config, tensors, _ = to_peft(x)
        return _parse_peft(config, tensors, f"<module {name}>")
    if not isinstance(x, (str, Path)):
        raise SubspacesError(f"{name}: expected a LoRA folder, a model with a LoRA or a PeftLoRA, "
                             f"got {type(x).__name__}")
    path = Path(x).expanduser()
    if (path / "subspaces_adapter.json").is_file():
        return _parse_native(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise SubspacesError(f"{name} {path}: not a LoRA folder (expected {CONFIG} and {WEIGHTS}, or a native "
                             "subspaces adapter)")
    return _parse_peft(read_json(path / CONFIG), read_safetensors(path / WEIGHTS), str(path))


def read_loras(models: Any) -> list[LoRASet]:
    """Read every adapter and check they fit one base: same modules, shapes, layer kinds, base model."""
    if isinstance(models, (str, Path, PeftLoRA, nn.Module)) or not models:
        raise SubspacesError("models must be a non-empty list of LoRA adapters")
    sets = [read_lora(m, f"adapter {i}") for i, m in enumerate(models)]
    ref = sets[0]
    for s in sets[1:]:
        if set(s.modules) != set(ref.modules):
            diff = sorted(set(s.modules) ^ set(ref.modules))[0]
            raise SubspacesError(f"{s.source} and {ref.source} adapt different modules (e.g. {diff!r}); LoRAs "
                                 "merge only when they target the same modules")
        for n, f in s.modules.items():
            g = ref.modules[n]
            if (f.A.shape[1:], f.B.shape[0], f.B.shape[2:], f.embedding) != \
                    (g.A.shape[1:], g.B.shape[0], g.B.shape[2:], g.embedding):
                shapes = [(x.B.shape[0], *x.A.shape[1:]) for x in (f, g)]
                raise SubspacesError(f"module {n!r}: ΔW has shape {shapes[0]} in {s.source} but {shapes[1]} in "
                                     f"{ref.source} (adapters of different base models?)")
        if s.fan_in_fan_out != ref.fan_in_fan_out:
            raise SubspacesError(f"{s.source} and {ref.source} disagree on fan_in_fan_out")
        if s.base and ref.base and s.base != ref.base:
            raise SubspacesError(f"{s.source} was trained on {s.base!r}, {ref.source} on {ref.base!r}")
    return sets


def build(modules: dict[str, tuple[Tensor, Tensor]], *, fan_in_fan_out: bool = False, base: str | None = None,
          embedding: set[str] = frozenset(), dtype: torch.dtype | None = None, report: list | None = None) -> PeftLoRA:
    """A PEFT LoRA at scale 1 from ``{module: (A, B)}`` (ΔW = B A); ranks may differ (rank/alpha patterns)."""
    tensors, ranks = {}, {}
    for name, (A, B) in modules.items():
        a_key, b_key = _suffixes("embedding" if name in embedding else "")
        tensors[f"{PREFIX}{name}.{a_key}"] = A.to(dtype or A.dtype).contiguous()
        tensors[f"{PREFIX}{name}.{b_key}"] = B.to(dtype or B.dtype).contiguous()
        ranks[name] = int(A.shape[0])
    config = peft_config(ranks, dict(ranks), base=base, fan_in_fan_out=fan_in_fan_out)  # alpha = r: scale 1
    return PeftLoRA(tensors, config, report or [])


def write_peft(out: Any, lora: PeftLoRA, *, info: dict[str, Any] | None = None, info_name: str = "merge_config.json"
               ) -> Path:
    """Write ``lora`` as a new PEFT folder ``out`` (refused if it exists); ``info`` goes to ``info_name``."""
    out = check_new_output(out)
    with atomic_dir(out) as tmp:
        write_safetensors(tmp / WEIGHTS, lora.state_dict, metadata={"format": "pt"})
        write_json(tmp / CONFIG, lora.config)
        write_json(tmp / info_name, {**(info or {}), "report": lora.report})
    return out
