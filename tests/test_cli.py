"""The command line: bad input exits 2 with one line, tune/compare write their outputs, torchrun matches one
process. Runs on a tiny random BERT saved as a Hugging Face folder (with MiniLM's tokenizer) and few examples."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
QUICK = ["--max-train", "64", "--max-test", "32", "--epochs", "1", "--batch-size", "16"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from subspaces.models import minilm_path

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "subspaces.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


def test_methods_lists_the_registry():
    r = cli("methods")
    assert r.returncode == 0
    assert "lora" in r.stdout and "arxiv.org/abs/2106.09685" in r.stdout
    assert "maestro (partial):" in r.stdout  # the note of a partial method


@pytest.mark.parametrize("args, message", [
    (["tune", "--method", "lorra"], "unknown method 'lorra'"),
    (["tune", "--task", "nope"], "unknown task 'nope'"),
    (["tune", "--model", "/no/such/model"], "/no/such/model"),
    (["compare", "-m", "lora:rank"], "expected key=value"),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    r = cli(*args, "--out", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--targets", "nothing_like_this"], "matches no module"),
    (["--rank", "0"], "rank=0"),
    (["--rank", "32"], "must be < min(d_in, d_out) = 32"),
])
def test_bad_adapter_settings_exit_2(tiny_model, tmp_path, extra, message):
    r = cli("tune", "--model", tiny_model, *QUICK, *extra, "--out", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_output_folder_with_other_files_is_refused(tiny_model, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    r = cli("tune", "--model", tiny_model, *QUICK, "--out", tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_corrupted_adapter_is_refused(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}))
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    r = cli("tune", "--model", tiny_model, *QUICK, "--adapter", bad, "--out", tmp_path / "out")
    assert r.returncode == 2 and "not a valid safetensors file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_tune_writes_adapter_in_both_formats_and_resumes(tiny_model, tmp_path):
    import subspaces as ss
    from subspaces.harness._classifier import MeanPoolClassifier

    out = tmp_path / "run"
    r = cli("tune", "--model", tiny_model, *QUICK, "--rank", "4", "--out", out)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["train_examples"] == 64
    # the LoRA factors on query/value (2 layers x 2 modules x r(32+32)) plus the 32x8 + 8 head
    assert metrics["trainable_params"] == 4 * 4 * (32 + 32) + 32 * 8 + 8
    assert {p.name for p in (out / "adapter").iterdir()} == {"subspaces_adapter.json", "subspaces_adapter.safetensors"}
    assert (out / "adapter-peft" / "adapter_model.safetensors").exists()
    # both formats load onto the base and agree
    from transformers import AutoModel

    models = []
    for sub in ("adapter", "adapter-peft"):
        torch.manual_seed(0)
        clf = MeanPoolClassifier(AutoModel.from_pretrained(tiny_model), 8)
        ss.load_adapter(clf, out / sub)
        models.append(clf)
    x = torch.randint(0, 1000, (2, 5))
    mask = torch.ones_like(x)
    torch.testing.assert_close(models[0](x, mask)["logits"], models[1](x, mask)["logits"], rtol=0, atol=1e-6)
    # continue from the saved adapter
    r = cli("tune", "--model", tiny_model, *QUICK, "--adapter", out / "adapter-peft", "--out", tmp_path / "more")
    assert r.returncode == 0, r.stderr


def test_compare_writes_leaderboard_with_baselines(tiny_model, tmp_path):
    out = tmp_path / "cmp"
    r = cli("compare", "--model", tiny_model, *QUICK, "-m", "lora:rank=2,targets=[query]", "--out", out)
    assert r.returncode == 0, r.stderr
    board = json.loads((out / "results.json").read_text())["leaderboard"]
    assert sorted(row["label"] for row in board) == ["full", "lora:rank=2,targets=[query]", "probe"]
    counts = {row["method"]: row["trainable_params"] for row in board}
    assert counts["probe"] < counts["lora"] < counts["full"]
    assert (out / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    assert "test acc" in r.stdout
    r = cli("compare", "--model", tiny_model, "--seed", "1", "--seed", "1", "--out", tmp_path / "dup")
    assert r.returncode == 2 and "repeats" in r.stderr and not (tmp_path / "dup").exists()


def test_torchrun_two_processes_match_one(tiny_model, tmp_path):
    """Data parallel (gloo on CPU) with the global batch split across 2 processes gives the adapter of 1 process."""
    from safetensors.torch import load_file

    args = ["tune", "--model", tiny_model, "--max-train", "64", "--max-test", "16", "--epochs", "2",
            "--batch-size", "16", "--rank", "4"]
    one = cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "subspaces.cli", *map(str, args), "--out", tmp_path / "two"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    a = load_file(tmp_path / "one" / "adapter" / "subspaces_adapter.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "subspaces_adapter.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("delta.B"))  # it did train
