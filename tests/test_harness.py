"""The comparison harness's pure parts: method specs, default targets, the classifier and its collator."""
from __future__ import annotations

import pytest
import torch
from conftest import llama_causal

from subspaces import SubspacesError
from subspaces.harness._methods import default_targets, parse_method
from subspaces.harness.compare import leaderboard, summarize


def test_parse_method_specs():
    assert parse_method("lora") == ("lora", {})
    assert parse_method("lora:rank=16,alpha=32.5,targets=[query, value],rslora=true") == (
        "lora", {"rank": 16, "alpha": 32.5, "targets": ["query", "value"], "rslora": True})
    assert parse_method("full") == ("full", {})
    assert parse_method("said:dim=1000,lr=3e-2,projection=dense") == (
        "said", {"dim": 1000, "lr": 0.03, "projection": "dense"})  # YAML 1.1 alone reads 3e-2 as a string


@pytest.mark.parametrize("spec, message", [
    ("lorra", "Did you mean 'lora'"),
    ("lora:rank", "expected key=value"),
    ("lora:rank=[1", "unbalanced brackets"),
    ("lora:=3", "expected key=value"),
])
def test_bad_method_specs(spec, message):
    with pytest.raises(SubspacesError, match=message):
        parse_method(spec)


def test_default_targets_follow_the_lora_paper():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert default_targets(bert) == ["query", "value"]
    assert default_targets(llama_causal()) == ["q_proj", "v_proj"]
    assert default_targets(torch.nn.Sequential(torch.nn.Linear(4, 4))) == "all-linear"


def test_leaderboard_order():
    rows = [{"test_accuracy": 0.8, "trainable_params": 10}, {"test_accuracy": 0.9, "trainable_params": 99},
            {"test_accuracy": 0.8, "trainable_params": 5}]
    assert [r["trainable_params"] for r in leaderboard(rows)] == [99, 5, 10]


def test_summarize_averages_each_method_over_its_seeds():
    def run(label, seed, acc):
        return {"label": label, "method": label, "seed": seed, "test_accuracy": acc, "trainable_params": 1,
                "wall_time_s": 2.0 * (seed + 1), "peak_memory_mb": 10.0}

    rows = summarize([run("a", 0, 0.8), run("b", 0, 0.9), run("a", 1, 0.9), run("b", 1, 0.9)])
    assert [r["label"] for r in rows] == ["b", "a"]
    a = rows[1]
    assert a["seeds"] == [0, 1] and a["test_accuracies"] == [0.8, 0.9]
    assert abs(a["test_accuracy"] - 0.85) < 1e-12 and abs(a["test_accuracy_std"] - 0.0707107) < 1e-6
    assert a["wall_time_s"] == 3.0 and rows[0]["test_accuracy_std"] == 0.0
    assert summarize([run("a", 0, 0.5)])[0]["test_accuracy_std"] == 0.0


def test_compare_runs_every_method_for_every_seed(tmp_path, monkeypatch):
    import json

    import subspaces.harness.compare as cmp

    def fake(kw):
        acc = 0.5 + 0.1 * kw["seed"] + (0.2 if kw["method"] == "full" else 0.0)
        return {"method": kw["method"], "seed": kw["seed"], "test_accuracy": acc, "trainable_params": 1,
                "wall_time_s": 1.0, "peak_memory_mb": 1.0, "loss_history": []}

    monkeypatch.setattr(cmp, "_run_in_fresh_process", fake)
    board = cmp.compare(["lora"], out=tmp_path, seeds=[0, 1])
    assert [r["label"] for r in board] == ["full", "probe", "lora"]  # ties keep the run order
    assert all(r["seeds"] == [0, 1] and abs(r["test_accuracy_std"] - 0.0707107) < 1e-6 for r in board)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 6 and saved["config"]["seeds"] == [0, 1]
    assert saved["config"]["methods"] == ["probe", "lora", "full"] and saved["config"]["model"] == "minilm"
    assert saved["versions"]["torch"] == torch.__version__
    assert (tmp_path / "leaderboard.png").exists() and (tmp_path / "loss_curves.png").exists()
    board = cmp.compare(["lora"], out=tmp_path / "alone", seeds=[2], baselines=False)
    assert [(r["label"], r["seeds"]) for r in board] == [("lora", [2])]


def test_classifier_features_path_equals_token_path():
    from transformers import BertConfig, BertModel

    from subspaces.harness._classifier import Collator, MeanPoolClassifier, embed

    torch.manual_seed(0)
    enc = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=50))
    clf = MeanPoolClassifier(enc, 3).eval()
    rows = [{"input_ids": [1, 5, 7], "labels": 0}, {"input_ids": [2, 9], "labels": 2}]
    batch = Collator(pad_id=0)(rows)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with torch.no_grad():
        direct = clf(**batch)
    feats = Collator(pad_id=0)(embed(clf, rows, Collator(0), torch.device("cpu"), bf16=False))
    with torch.no_grad():
        via = clf(**feats)
    torch.testing.assert_close(via["logits"], direct["logits"])
    torch.testing.assert_close(via["loss"], direct["loss"])


def test_data_init_runs_lora_sb_gradient_init_and_refuses_other_methods():
    from transformers import BertConfig, BertModel

    import subspaces as ss
    from subspaces.adapters._core import DELTA, adapted_layers
    from subspaces.harness._classifier import Collator, MeanPoolClassifier
    from subspaces.harness.finetune import configure, data_init

    torch.manual_seed(0)
    enc = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=50))
    clf = MeanPoolClassifier(enc, 3)
    configure(clf, "lora_sb", {"rank": 2})
    rows = [{"input_ids": [1 + i, 5, 7], "labels": i % 3} for i in range(8)]
    batches = [Collator(0)(rows[:4]), Collator(0)(rows[4:])]
    delta = adapted_layers(clf)[0][1]._modules[DELTA]
    assert delta.R.abs().max() == 0  # plain init
    data_init(clf, "lora_sb", batches, 2, lr=1e-3, total_steps=10)
    assert delta.R.abs().max() > 0  # the gradient-estimate init set R = Σ_r / s
    with pytest.raises(SubspacesError, match="no data-driven initialization"):
        data_init(clf, "lora", batches, 2, lr=1e-3, total_steps=10)
    with pytest.raises(SubspacesError, match="init_batches"):
        data_init(clf, "lora_sb", batches, "x", lr=1e-3, total_steps=10)
    assert ss.adapter_parameters(clf)


def test_train_head_false_puts_the_head_in_the_subspace_only():
    from transformers import BertConfig, BertModel

    from subspaces.adapters._core import adapted_layers
    from subspaces.harness._classifier import MeanPoolClassifier
    from subspaces.harness.finetune import configure

    torch.manual_seed(0)
    enc = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=50))
    clf = MeanPoolClassifier(enc, 3)
    configure(clf, "said", {"dim": 40, "train_head": False, "targets": ["query", "value"]})
    assert [n for n, _ in adapted_layers(clf)][-1] == "classifier"
    assert sum(p.numel() for p in clf.parameters() if p.requires_grad) == 40  # θ_d and λ, nothing else
    assert not any(p.requires_grad for n, p in clf.classifier.named_parameters() if not n.startswith("delta."))


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    from subspaces.harness.finetune import classification_scores

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=g)
    pred = torch.where(torch.rand(200, generator=g) < 0.6, labels, torch.randint(0, 5, (200,), generator=g))
    pred[pred == 4] = 3  # a class never predicted
    s = classification_scores(pred.numpy(), labels.numpy(), num_labels=6)  # class 5: neither true nor predicted
    assert s["test_accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert s["test_macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))


def test_leaderboard_of_a_causal_lm_without_answers_sorts_by_loss():
    rows = [{"label": "a", "test_accuracy": None, "eval_loss": 2.0, "trainable_params": 1},
            {"label": "b", "test_accuracy": None, "eval_loss": 1.0, "trainable_params": 1}]
    assert [r["label"] for r in leaderboard(rows)] == ["b", "a"]
