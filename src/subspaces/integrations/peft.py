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


def _svd_factors(dw: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B (m, r), A (r, n) with B A the best rank-r approximation of dw (m, n), and its relative Frobenius error.
    ``rank=None``: the numerical rank, so the factorization is exact to float precision."""
    U, S, Vh = torch.linalg.svd(dw.double(), full_matrices=False)
    tol = S.max().clamp_min(1e-300) * max(dw.shape) * torch.finfo(torch.float32).eps
    exact = max(int((S > tol).sum()), 1)
    r = exact if rank is None else max(1, min(rank, exact))
    root = S[:r].sqrt()
    error = float(S[r:].norm() / S.norm().clamp_min(1e-300))
    return (U[:, :r] * root).float(), (root[:, None] * Vh[:r]).float(), error


def _lora_factors(layer: nn.Module, delta, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A, B, scaling, relative error) in PEFT's layout for one adapted layer."""
    from ..adapters.lora import _kind

    if rank is None and delta.config.registry_name == "lora":
        A, B, s = delta.A.detach(), delta.B.detach(), delta.config.scaling
        if delta.offset() is not None:  # PiSSA: W_res + sBA = W0 + s[B, -B0][A; A0] (PEFT's own conversion)
            A, B = torch.cat([A, delta.A0]), torch.cat([B, -delta.B0], dim=1)
        return A, B, s, 0.0
    kind = _kind(layer)
    with torch.no_grad():
        dw = delta.weight().float()
        if delta.offset() is not None:
            dw = dw - delta.offset().float()
    w = layer.weight
    matrix = dw.reshape(w.shape[0], -1) if kind in ("linear", "conv") else dw.T  # (d_out, d_in) as PEFT's B A
    B, A, error = _svd_factors(matrix, rank)
    if kind == "conv":
        A = A.reshape(A.shape[0], *w.shape[1:])
        B = B.reshape(*B.shape, *(1,) * (w.dim() - 2))
    return A, B, 1.0, error


def to_peft(model: nn.Module, *, rank: int | None = None, lora_only: bool = True) -> tuple[dict, dict, list[dict]]:
    """(adapter_config.json contents, tensors, per-layer report) of the model's adapter as a PEFT LoRA.

    ``lora_only``: refuse any method but ``lora`` (``save_adapter(format="peft")``); otherwise every foldable
    adapter converts through the SVD of its ΔW — exact at ``rank=None``, the best rank-``rank`` approximation
    otherwise (``export_lora``).
    """
    modules, saved, state = adapter_state(model)
    tensors, ranks, alphas, dropouts, rslora, fan_in_fan_out, report = {}, {}, {}, [], [], [], []
    for name, layer in adapted_layers(model):
        delta = layer._modules[DELTA]
        method = modules[name]["method"]
        if lora_only and method != "lora":
            raise SubspacesError(f"{name}: method {method!r} is not LoRA-shaped; save it with format='native' "
                                 "or convert it with ss.export_lora")
        A, B, scaling, error = _lora_factors(layer, delta, rank)
        ranks[name] = A.shape[0]
        alphas[name] = scaling  # turned into lora_alpha below, once use_rslora is known
        dropouts.append(float(getattr(delta.config, "dropout", 0.0)))
        rslora.append(method == "lora" and rank is None and delta.config.rslora)
        fan_in_fan_out.append(type(layer).__name__ == "Conv1D")
        a_key, b_key = _suffixes("embedding" if isinstance(layer, nn.Embedding) else "")
        tensors[f"{PREFIX}{name}.{a_key}"] = A
        tensors[f"{PREFIX}{name}.{b_key}"] = B
        report.append({"name": name, "method": method, "rank": ranks[name], "relative_error": error})
    if len(set(fan_in_fan_out)) > 1:
        raise SubspacesError("PEFT needs one fan_in_fan_out setting for the whole adapter")
    use_rslora = all(rslora)
    alphas = {n: s * (ranks[n] ** 0.5 if use_rslora else ranks[n]) for n, s in alphas.items()}
    for key, value in state.items():
        if f".{DELTA}." not in key:  # modules_to_save
            tensors[PREFIX + key] = value
    config = peft_config(ranks, alphas, dropout=Counter(dropouts).most_common(1)[0][0], use_rslora=use_rslora,
                         fan_in_fan_out=fan_in_fan_out[0], modules_to_save=saved or None)
    return config, tensors, report


def peft_config(ranks: dict[str, int], alphas: dict[str, float], *, base: str | None = None, dropout: float = 0.0,
                use_rslora: bool = False, fan_in_fan_out: bool = False, modules_to_save: list | None = None) -> dict:
    """``adapter_config.json`` of a LoRA with these per-module ranks and alphas: the most common as ``r`` /
    ``lora_alpha``, the others as anchored rank / alpha patterns."""
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "rank_pattern": {f"^{re.escape(n)}": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(n)}": v for n, v in alphas.items() if v != alpha},
        "use_rslora": use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
    }


def export_lora(model: nn.Module, path: str | Path, *, rank: int | None = None) -> list[dict]:
    """Write any foldable adapter as a plain PEFT LoRA folder (servable by PEFT-format loaders).

    ``rank=None`` is exact (each layer at the numerical rank of its ΔW); an integer truncates each ΔW to its best
    rank-``rank`` approximation (SVD). Returns one row per layer: name, method, rank, relative Frobenius error of
    the exported ΔW.
    """
    from .._io import atomic_dir, write_json, write_safetensors

    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise SubspacesError(f"export_lora rank={rank!r}: must be a positive integer or None")
    config, tensors, report = to_peft(model, rank=rank, lora_only=False)
    with atomic_dir(path, overwrite_ours=(CONFIG, WEIGHTS)) as tmp:
        write_safetensors(tmp / WEIGHTS, tensors, metadata={"format": "pt"})
        write_json(tmp / CONFIG, config)
    return report


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
