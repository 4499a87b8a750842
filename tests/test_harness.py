"""The comparison harness's pure parts: method specs, default targets, the classifier and its collator."""
from __future__ import annotations

import pytest
import torch
from conftest import llama_causal

from subspaces import SubspacesError
from subspaces.harness.compare import leaderboard, parse_method
from subspaces.harness.finetune import default_targets


def test_parse_method_specs():
    assert parse_method("lora") == ("lora", {})
    assert parse_method("lora:rank=16,alpha=32.5,targets=[query, value],rslora=true") == (
        "lora", {"rank": 16, "alpha": 32.5, "targets": ["query", "value"], "rslora": True})
    assert parse_method("full") == ("full", {})


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
