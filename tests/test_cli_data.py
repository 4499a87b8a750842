"""The command line on a user's data files and on causal LMs: tune and compare with --data, the arithmetic task,
adapters and train methods in one leaderboard, and one-line errors on bad columns."""
from __future__ import annotations

import json

import pytest
from conftest import tiny_lm_folder
from test_cli import QUICK, cli, tiny_model  # noqa: F401  (a fixture)

LM_QUICK = ["--max-steps", "2", "--batch-size", "4", "--max-train", "16", "--max-test", "4", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm_folder(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"What is {i} plus 2?", "a": f" {i} + 2 = {i + 2}.\n#### {i + 2}"}) + "\n"
                            for i in range(30)))
    return path


def test_tune_causal_lm_on_a_file_writes_adapter_metrics_and_generations(lm, qa, tmp_path):
    out = tmp_path / "run"
    r = cli("tune", "--task", "causal-lm", "--data", qa, "--prompt-column", "q", "--completion-column", "a",
            "--model", lm, "-m", "lora", *LM_QUICK, "--out", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "adapter-peft", "generations.jsonl", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_kind"] == "causal-lm" and metrics["steps"] == 2 and metrics["test_examples"] == 3
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["prompt"].startswith("What is") and "#### " in rows[0]["reference"]


def test_tune_full_causal_lm_writes_a_model_folder(lm, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    r = cli("tune", "--task", "arithmetic", "--model", lm, "-m", "full", *LM_QUICK, "--out", out)
    assert r.returncode == 0, r.stderr
    AutoModelForCausalLM.from_pretrained(out / "model")
    assert (out / "model" / "tokenizer.json").is_file()


def test_compare_puts_adapters_and_train_methods_in_one_leaderboard(lm, tmp_path):
    out = tmp_path / "board"
    r = cli("compare", "--task", "arithmetic", "--model", lm, "-m", "lora", "-m", "galore:rank=4,update_every=1",
            "-m", "dct:rank=4", *LM_QUICK, "--out", out)
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["methods"] == ["zero-shot", "lora", "galore:rank=4,update_every=1", "dct:rank=4", "full"]
    assert {r["kind"] for r in saved["runs"]} == {"baseline", "adapter", "train"}
    assert all(r["loss_history"] or r["method"] == "zero-shot" for r in saved["runs"])
    assert all(key in saved["runs"][1] for key in ("memory", "artifact_bytes", "optimizer_state_bytes", "versions"))
    assert len(list((out / "generations").iterdir())) == 5
    assert (out / "leaderboard.png").is_file() and (out / "loss_curves.png").is_file()
    assert "held-out" in r.stdout and "zero-shot" in r.stdout


def test_compare_classification_on_a_csv(tiny_model, tmp_path):  # noqa: F811
    import csv

    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "topic"])
        for i in range(60):
            w.writerow([f"{'red green blue' if i % 2 else 'cat dog bird'} {i}", "colors" if i % 2 else "animals"])
    out = tmp_path / "board"
    r = cli("compare", "--task", "classification", "--data", path, "--text-column", "sentence", "--label-column",
            "topic", "--model", tiny_model, "-m", "lora", "-m", "galore:rank=4", *QUICK, "--out", out)
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in saved["runs"]] == ["probe", "lora", "galore:rank=4", "full"]
    assert all(0 <= r["test_macro_f1"] <= 1 for r in saved["runs"])


@pytest.mark.parametrize("args, message", [
    (["--task", "classification", "--text-column", "body"], "no column 'body' (--text-column); columns found: q, a"),
    (["--task", "causal-lm"], "columns found: q, a"),
    (["--task", "causal-lm", "--prompt-column", "q", "--completion-column", "a", "--answer-pattern", "("],
     "not a valid regular expression"),
    (["--task", "causal-lm", "--prompt-column", "q", "--completion-column", "a", "-m", "probe"],
     "not a baseline of a causal-lm task"),
])
def test_bad_data_input_is_one_line(qa, tmp_path, args, message):
    r = cli("tune", "--data", qa, *args, "--out", tmp_path / "out")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_causal_lm_two_processes_match_one(lm, tmp_path):
    """The causal-LM recipe under DDP (gloo, 2 processes, the global batch split): the loss at every step and the
    trained adapter equal one process's (completion tokens are averaged over both processes' batches)."""
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_cli import ENV

    args = ["tune", "--task", "arithmetic", "--model", lm, "-m", "lora", "--max-steps", "6", "--batch-size", "8",
            "--max-train", "48", "--max-test", "4", "--max-new-tokens", "2", "--lr", "1e-2"]
    one = cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29534", "-m", "subspaces.cli", *map(str, args), "--out", tmp_path / "two"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["world_size"] == 2
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(m1["loss_history"], m2["loss_history"])) <= 1e-4
    a = load_file(tmp_path / "one" / "adapter" / "subspaces_adapter.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "subspaces_adapter.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
