"""`subspaces compress` on a tiny random LLaMA saved as a Hugging Face folder (with MiniLM's tokenizer): writes the
model folder and reports, the folder reloads to the same perplexity, and bad input exits 2 with nothing written."""
from __future__ import annotations

import json

import pytest
import torch
from test_cli import cli

QUICK = ["--calib-samples", "4", "--seq-len", "32", "--eval-samples", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoTokenizer

    import subspaces as ss
    from subspaces.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    path = tmp_path_factory.mktemp("tiny-llama")
    ss.models.tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_compress_writes_model_and_reports(tiny_lm, tmp_path):
    out = tmp_path / "run"
    r = cli("compress", "--model", tiny_lm, "-m", "svd_llm", "--ratio", "0.3", "--out", out, *QUICK)
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "report.json").read_text())
    assert 0.25 < result["ratio"] < 0.4 and len(result["report"]["layers"]) == 14
    assert (out / "report.md").read_text().startswith("# svd_llm")
    assert (out / "model" / "compression.json").is_file()
    from subspaces.harness import compress as H
    from subspaces.models import load_causal_lm

    model, tok = load_causal_lm(str(out / "model"), torch.float32, torch.device("cpu"))
    windows = H.eval_windows(H.corpus_split(tok)[1], 32, 4)
    assert H.perplexity(model, windows) == pytest.approx(result["ppl_after"], rel=1e-5)
    r = cli("compress", "--model", out / "model", "-m", "svd", "--out", tmp_path / "again", *QUICK)
    assert r.returncode == 2 and "already compressed" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["-m", "svdd"], "did you mean"),
    (["-m", "svd", "--ratio", "1.5"], "ratio"),
    (["-m", "svd", "--allocation", "magic"], "allocation"),
    (["-m", "svd", "-p", "svd=fast"], "svd="),
    (["-m", "svd", "--dtype", "float16"], "dtype"),
])
def test_bad_input_exits_2_and_writes_nothing(tiny_lm, tmp_path, args, message):
    out = tmp_path / "run"
    r = cli("compress", "--model", tiny_lm, *args, "--out", out, *QUICK)
    assert r.returncode == 2 and message.lower() in r.stderr.lower(), r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_existing_output_folder_is_refused(tiny_lm, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    r = cli("compress", "--model", tiny_lm, "-m", "svd", "--out", out, *QUICK)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
