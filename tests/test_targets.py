"""Target selection (subspaces._targets): PEFT's matching rules, exclusion, heads, errors, dry run."""
from __future__ import annotations

import pytest
import torch
from conftest import bert_seqcls, grad_flags, llama_causal, state_snapshot
from torch import nn

import subspaces as ss
from subspaces import SubspacesError
from subspaces._targets import select


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Module()
        self.x.query = nn.Linear(4, 4)
        self.x.query2 = nn.Linear(4, 4)
        self.x.myquery = nn.Linear(4, 4)
        self.y = nn.Linear(4, 4)


def names(model, targets, exclude=None):
    return [n for n, _ in select(model, targets, exclude)]


def test_regex_is_a_full_match():
    m = Named()
    assert names(m, r"x\.query") == ["x.query"]
    assert names(m, r"x\.query\d?") == ["x.query", "x.query2"]
    assert names(m, r".*query.*") == ["x.query", "x.query2", "x.myquery"]
    # a regex that matches only part of a name selects nothing
    with pytest.raises(SubspacesError):
        select(m, r"query")
    with pytest.raises(SubspacesError):
        select(m, r"x\.que")


def test_list_is_a_suffix_match_on_whole_name_parts():
    m = Named()
    assert names(m, ["query"]) == ["x.query"]           # not x.query2, not x.myquery
    assert names(m, ["query2", "y"]) == ["x.query2", "y"]
    assert names(m, ["x.query"]) == ["x.query"]
    with pytest.raises(SubspacesError):
        select(m, ["uery"])


def test_bert_list_targets():
    m = bert_seqcls()
    got = names(m, ["query", "value"])
    assert got == [f"bert.encoder.layer.{i}.attention.self.{k}" for i in range(2) for k in ("query", "value")]


def test_all_linear_excludes_llama_lm_head():
    m = llama_causal()
    got = names(m, "all-linear")
    linear = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert "lm_head" in linear
    assert "lm_head" not in got
    assert sorted(got) == sorted(n for n in linear if n != "lm_head")
    assert len(got) == 2 * 7


def test_all_linear_excludes_bert_classifier():
    m = bert_seqcls()
    got = names(m, "all-linear")
    assert "classifier" not in got
    assert "bert.encoder.layer.0.attention.self.query" in got
    assert "bert.pooler.dense" in got
    assert all(isinstance(dict(m.named_modules())[n], nn.Linear) for n in got)
    assert len(got) == 2 * 6 + 1


def test_exclude_list_and_regex():
    m = llama_causal()
    full = names(m, "all-linear")
    got = names(m, "all-linear", exclude=["q_proj", "down_proj"])
    assert set(got) == {n for n in full if not n.endswith(("q_proj", "down_proj"))}
    got = names(m, "all-linear", exclude=r"model\.layers\.0\..*")
    assert got and all(n.startswith("model.layers.1.") for n in got)
    # exclude with a partial regex excludes nothing
    assert names(m, "all-linear", exclude=r"q_proj") == full


def test_exclude_everything_is_an_error():
    m = bert_seqcls()
    with pytest.raises(SubspacesError, match="matches no module"):
        select(m, ["query"], exclude=["query"])


def test_nothing_matched_shows_real_module_names():
    m = llama_causal()
    with pytest.raises(SubspacesError) as e:
        select(m, ["query", "value"])
    msg = str(e.value)
    assert "q_proj" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "query" in msg  # names what the user asked for
    with pytest.raises(SubspacesError, match=r"model\.layers"):
        ss.adapt_(m, "lora", rank=2, targets=r"nonexistent\..*")


@pytest.mark.parametrize("bad", [r"(unclosed", r"*q_proj", r"[a-"])
def test_invalid_regex_is_a_subspaces_error(bad):
    m = llama_causal()
    with pytest.raises(SubspacesError, match="regular expression"):
        select(m, bad)
    with pytest.raises(SubspacesError, match="regular expression"):
        select(m, "all-linear", exclude=bad)


def test_bad_selector_type():
    with pytest.raises(SubspacesError):
        select(Named(), [1, 2])  # type: ignore[list-item]


def test_inspect_targets_lists_and_changes_nothing():
    m = llama_causal()
    m.model.embed_tokens.weight.requires_grad_(False)  # a non-default flag that must survive
    before, flags = state_snapshot(m), grad_flags(m)
    rows = ss.inspect_targets(m, ["k_proj", "down_proj"])
    assert [r["name"] for r in rows] == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    assert rows[0]["type"] == "Linear"
    assert rows[0]["shape"] == (16, 32)          # 2 kv heads × head_dim 8, (out, in)
    assert rows[0]["params"] == 16 * 32          # Llama linears have no bias
    assert rows[1]["shape"] == (32, 64) and rows[1]["params"] == 32 * 64
    after = m.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert grad_flags(m) == flags
    assert not any(hasattr(mod, "delta") for mod in m.modules())


def test_inspect_targets_counts_bias():
    m = bert_seqcls()
    rows = ss.inspect_targets(m, ["classifier"])
    assert rows == [{"name": "classifier", "type": "Linear", "shape": (3, 32), "params": 3 * 32 + 3}]


def test_all_linear_skips_multihead_attention_out_proj():
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj: a hook there would never run
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    assert names(m, "all-linear") == ["linear1", "linear2"]
    with pytest.raises(SubspacesError, match="MultiheadAttention"):
        ss.adapt_(m, "lora", rank=2, targets=["out_proj", "linear1"])
    assert not any(hasattr(mod, "delta") for mod in m.modules())
