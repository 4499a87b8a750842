"""PEFT's LoRA format: ``adapter_model.safetensors`` (``base_model.model.<path>.lora_A.weight``, ...) and
``adapter_config.json``. Written and read here without importing peft."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .._errors import SubspacesError
from .._io import read_json, read_safetensors
from ..adapters._core import DELTA, adapter_state, adapted_layers, attach_state

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
# PEFT features this importer cannot represent exactly: refuse rather than load something else.
# Each is off when absent, None, False or empty; any other value changes the forward pass.
_UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "layer_replication", "alora_invocation_tokens",
                "trainable_token_indices", "target_parameters", "use_bdlora", "arrow_config")


def _suffixes(kind: str) -> tuple[str, str]:
    return ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")


def to_peft(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json contents, tensors) of the model's LoRA adapter in PEFT's format."""
    modules, saved, state = adapter_state(model)
    tensors, ranks, alphas, dropouts, rslora, fan_in_fan_out = {}, {}, {}, [], [], []
    for name, layer in adapted_layers(model):
        delta = layer._modules[DELTA]
        if modules[name]["method"] != "lora":
            raise SubspacesError(f"{name}: method {modules[name]['method']!r} is not LoRA-shaped; "
                                 "save it with format='native'")
        A, B, cfg = delta.A, delta.B, delta.config
        if delta.offset() is not None:  # PiSSA: W_res + sBA = W0 + s[B, -B0][A; A0] (PEFT's own conversion)
            A, B = torch.cat([A, delta.A0]), torch.cat([B, -delta.B0], dim=1)
        r = A.shape[0]
        ranks[name] = r
        alphas[name] = cfg.scaling * (r ** 0.5 if cfg.rslora else r)
        dropouts.append(cfg.dropout)
        rslora.append(cfg.rslora)
        fan_in_fan_out.append(delta.kind == "conv1d_t")
        a_key, b_key = _suffixes(delta.kind)
        tensors[f"{PREFIX}{name}.{a_key}"] = A.detach()
        tensors[f"{PREFIX}{name}.{b_key}"] = B.detach()
    if len(set(rslora)) > 1 or len(set(fan_in_fan_out)) > 1:
        raise SubspacesError("PEFT needs one use_rslora / fan_in_fan_out setting for the whole adapter")
    for key, value in state.items():
        if f".{DELTA}." not in key:  # modules_to_save
            tensors[PREFIX + key] = value
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": Counter(dropouts).most_common(1)[0][0],
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "rank_pattern": {f"^{re.escape(n)}": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(n)}": v for n, v in alphas.items() if v != alpha},
        "use_rslora": rslora[0],
        "fan_in_fan_out": fan_in_fan_out[0],
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": saved or None,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
    }
    return config, tensors


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule (``peft.utils.other.get_pattern_key``): the first key with re.match(r"(.*\\.)?(key)$")."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_peft(model: nn.Module, path: str | Path) -> nn.Module:
    """Attach the PEFT LoRA adapter in folder ``path`` to ``model`` (in place)."""
    path = Path(path)
    cfg = read_json(path / CONFIG)
    if cfg.get("peft_type") != "LORA":
        raise SubspacesError(f"{path / CONFIG}: peft_type={cfg.get('peft_type')!r}; only LORA adapters import")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise SubspacesError(f"{path / CONFIG}: {key}={cfg[key]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise SubspacesError(f"{path / CONFIG}: bias={cfg['bias']!r} is not supported; only 'none'")
    if not (path / WEIGHTS).exists():
        raise SubspacesError(f"{path}: {WEIGHTS} is missing (pickled adapter_model.bin files are not read)")
    raw = read_safetensors(path / WEIGHTS)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    tensors, saved = {}, set()
    for key, value in raw.items():
        key = key.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            for suffix in (f".{part}.weight", f".{part}"):
                if key.endswith(suffix):
                    factors.setdefault(key[: -len(suffix)], {})[part[-1]] = value
                    break
            else:
                continue
            break
        else:  # a modules_to_save tensor
            key = key.replace(".modules_to_save.", ".")
            saved.add(key.rsplit(".", 1)[0])
            tensors[key] = value
    if not factors:
        raise SubspacesError(f"{path / WEIGHTS} holds no LoRA tensors")
    modules = {}
    for name, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise SubspacesError(f"{path / WEIGHTS}: module {name!r} lacks lora_A or lora_B")
        rank = ab["A"].shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
        modules[name] = {"method": "lora", "config": {
            "rank": rank, "alpha": float(alpha), "dropout": float(cfg.get("lora_dropout", 0.0)),
            "rslora": bool(cfg.get("use_rslora", False)), "init": "kaiming"}}
        tensors[f"{name}.{DELTA}.A"] = ab["A"]
        tensors[f"{name}.{DELTA}.B"] = ab["B"]
    return attach_state(model, modules, sorted(saved), tensors, str(path))
