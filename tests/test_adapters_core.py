"""The adapter machinery written once (subspaces.adapters._core / _saving), exercised through LoRA."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import (
    bert_seqcls,
    grad_flags,
    ids,
    llama_causal,
    logits,
    plain,
    plain_inputs,
    randomize_adapters,
    state_snapshot,
)
from torch import nn

import subspaces as ss
from subspaces import SubspacesError
from subspaces.adapters import LoRA
from subspaces.adapters._core import DELTA, adapted_layers

QV = ["query", "value"]


def assert_untouched(model: nn.Module, before: dict, flags: dict) -> None:
    """The model is exactly as it was: no adapter, no hook, same tensors and requires_grad flags."""
    assert adapted_layers(model) == []
    assert not any(m._forward_hooks for m in model.modules())
    assert "_subspaces_state" not in model.__dict__
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert grad_flags(model) == flags


def trained_bert(rank=4, seed=0, **kw):
    base = bert_seqcls()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=rank, alpha=8, targets=QV, **kw)
    randomize_adapters(m, seed=seed)
    return base, m


# -- attaching -------------------------------------------------------------------------------------------------

def test_adapted_layer_keeps_class_and_keys():
    base = bert_seqcls()
    keys = list(base.state_dict())
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, targets=QV)
    q = m.bert.encoder.layer[0].attention.self.query
    assert type(q) is nn.Linear
    assert isinstance(q.delta, ss.adapters.Delta)
    new = list(m.state_dict())
    assert [k for k in new if f".{DELTA}." not in k] == keys
    extra = sorted(k for k in new if f".{DELTA}." in k)
    assert extra == sorted(f"bert.encoder.layer.{i}.attention.self.{t}.delta.{p}"
                           for i in range(2) for t in QV for p in "AB")


def test_fold_leaves_exactly_the_original_keys_and_outputs():
    base, m = trained_bert()
    x = ids()
    adapted = logits(m, x)
    assert not torch.allclose(adapted, logits(base, x))
    ss.fold_(m)
    assert list(m.state_dict()) == list(base.state_dict())
    assert adapted_layers(m) == [] and not any(mod._forward_hooks for mod in m.modules())
    torch.testing.assert_close(logits(m, x), adapted, atol=1e-5, rtol=0)
    # the folded model loads into a fresh base with strict=True
    fresh = bert_seqcls(seed=5)
    fresh.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, x), adapted, atol=1e-5, rtol=0)
    with pytest.raises(SubspacesError, match="no adapter"):
        ss.fold_(m)


def test_unadapt_restores_outputs_and_requires_grad():
    base = bert_seqcls()
    base.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a user's own choice must survive
    before, flags = state_snapshot(base), grad_flags(base)
    x = ids()
    ref = logits(base, x)
    ss.adapt_(base, "lora", rank=4, targets="all-linear", modules_to_save=["classifier"])
    randomize_adapters(base)
    assert not torch.allclose(logits(base, x), ref)
    assert not any(p.requires_grad for n, p in base.named_parameters() if "delta" not in n and "classifier" not in n)
    ss.unadapt_(base)
    assert torch.equal(logits(base, x), ref)
    assert_untouched(base, before, flags)
    assert flags["bert.embeddings.word_embeddings.weight"] is False
    assert flags["bert.embeddings.position_embeddings.weight"] is True


def test_adapters_disabled_gives_base_outputs_then_restores():
    base, m = trained_bert()
    x = ids()
    ref, adapted = logits(base, x), logits(m, x)
    with ss.adapters_disabled(m) as inner:
        assert inner is m
        assert torch.equal(logits(m, x), ref)
    assert torch.equal(logits(m, x), adapted)
    # restored even when the block raises
    with pytest.raises(RuntimeError), ss.adapters_disabled(m):
        raise RuntimeError("boom")
    assert torch.equal(logits(m, x), adapted)


def test_trained_modules_to_save_are_bypassed_when_disabled_and_restored_by_unadapt():
    base, m = trained_bert(modules_to_save=["classifier"])
    with torch.no_grad():
        m.classifier.weight.add_(1.0)  # "train" the head in place
    x = ids()
    ref, adapted = logits(base, x), logits(m, x)
    with ss.adapters_disabled(m):
        assert torch.equal(logits(m, x), ref)
    assert torch.equal(logits(m, x), adapted)
    ss.unadapt_(m)
    assert torch.equal(logits(m, x), ref)
    assert torch.equal(m.classifier.weight, base.classifier.weight)


def test_adapter_parameters_are_exactly_the_trainable_ones():
    m = bert_seqcls()
    ss.adapt_(m, "lora", rank=4, targets=QV, modules_to_save=["classifier"])
    got = {id(p) for p in ss.adapter_parameters(m)}
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert got == trainable
    assert len(ss.adapter_parameters(m)) == len(got)  # no duplicates
    named = {n for n, p in m.named_parameters() if p.requires_grad}
    assert named == {f"bert.encoder.layer.{i}.attention.self.{t}.delta.{p}"
                     for i in range(2) for t in QV for p in "AB"} | {"classifier.weight", "classifier.bias"}


def test_adapting_an_adapted_layer_errors_and_keeps_the_first_adapter():
    base, m = trained_bert()
    x = ids()
    adapted = logits(m, x)
    with pytest.raises(SubspacesError, match="already adapted"):
        ss.adapt_(m, "lora", rank=2, targets=["key", "value"])
    # the key layers the failed call attached first were removed again, the first adapter is intact
    assert [n for n, _ in adapted_layers(m)] == [f"bert.encoder.layer.{i}.attention.self.{t}"
                                                 for i in range(2) for t in QV]
    assert torch.equal(logits(m, x), adapted)
    assert {id(p) for p in ss.adapter_parameters(m)} == {id(p) for p in m.parameters() if p.requires_grad}


def test_two_adapt_calls_on_disjoint_targets():
    m = llama_causal()
    ss.adapt_(m, "lora", rank=4, targets=["q_proj"])
    ss.adapt_(m, "lora", rank=2, targets=["v_proj"])
    ranks = {n.rsplit(".", 1)[-1]: layer.delta.A.shape[0] for n, layer in adapted_layers(m)}
    assert ranks == {"q_proj": 4, "v_proj": 2}


def test_failing_adapt_leaves_the_model_untouched():
    m = llama_causal()
    m.lm_head.weight.requires_grad_(False)
    before, flags = state_snapshot(m), grad_flags(m)
    # q_proj (32x32) takes rank 16 and is attached first; k_proj (16 out) cannot, so the call fails midway
    with pytest.raises(SubspacesError, match="k_proj"):
        ss.adapt_(m, "lora", rank=16, targets="all-linear")
    assert_untouched(m, before, flags)


def test_failing_pissa_adapt_restores_base_weights():
    # PiSSA moves the principal part out of the weight at attach: a later failure must put it back.
    m = llama_causal()
    before, flags = state_snapshot(m), grad_flags(m)
    with pytest.raises(SubspacesError):
        ss.adapt_(m, "lora", rank=16, init="pissa", targets="all-linear")
    assert adapted_layers(m) == []
    after = m.state_dict()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-5, rtol=0)
    assert grad_flags(m) == flags


# -- errors that tell the user what to do ------------------------------------------------------------------------

def test_unknown_method_suggests_close_names():
    with pytest.raises(SubspacesError, match="Did you mean 'lora'"):
        ss.adapt_(bert_seqcls(), "lorra", targets=QV)


def test_unknown_hyperparameter_lists_valid_ones():
    m = bert_seqcls()
    before, flags = state_snapshot(m), grad_flags(m)
    with pytest.raises(SubspacesError) as e:
        ss.adapt_(m, "lora", ranks=4, targets=QV)
    msg = str(e.value)
    assert "ranks" in msg
    for name in ("rank", "alpha", "dropout", "rslora", "init"):
        assert name in msg
    assert_untouched(m, before, flags)


def test_unknown_hyperparameter_with_config_object():
    with pytest.raises(SubspacesError, match="rank"):
        ss.adapt_(bert_seqcls(), LoRA(rank=2), ranks=4, targets=QV)


def test_config_object_with_override():
    m = bert_seqcls()
    ss.adapt_(m, LoRA(rank=2, alpha=4), rank=3, targets=QV)
    d = m.bert.encoder.layer[0].attention.self.query.delta
    assert d.A.shape == (3, 32) and d.config.alpha == 4


@pytest.mark.parametrize("rank", [0, -1])
def test_nonpositive_rank(rank):
    with pytest.raises(SubspacesError, match="rank"):
        LoRA(rank=rank)
    with pytest.raises(SubspacesError, match="rank"):
        ss.adapt_(bert_seqcls(), "lora", rank=rank, targets=QV)


@pytest.mark.parametrize("rank", [32, 33, 100])
def test_rank_not_below_min_dim(rank):
    m = bert_seqcls()  # query is 32 x 32
    before, flags = state_snapshot(m), grad_flags(m)
    with pytest.raises(SubspacesError, match="min"):
        ss.adapt_(m, "lora", rank=rank, targets=QV)
    assert_untouched(m, before, flags)


def test_rank_just_below_min_dim_is_fine():
    m = bert_seqcls()
    ss.adapt_(m, "lora", rank=31, targets=QV)
    assert m.bert.encoder.layer[0].attention.self.query.delta.A.shape == (31, 32)


@pytest.mark.parametrize("bad", [dict(dropout=1.0), dict(dropout=-0.1), dict(init="xavier"), dict(rank=2.0)])
def test_bad_config_values(bad):
    with pytest.raises(SubspacesError):
        LoRA(**bad)


# -- save / load -------------------------------------------------------------------------------------------------

def test_native_round_trip(tmp_path):
    base, m = trained_bert(modules_to_save=["classifier"])
    with torch.no_grad():
        m.classifier.weight.add_(1.0)
    x = ids()
    ref = logits(m, x)
    out = ss.save_adapter(m, tmp_path / "a")
    assert sorted(os.listdir(out)) == ["subspaces_adapter.json", "subspaces_adapter.safetensors"]
    header = json.loads((out / "subspaces_adapter.json").read_text())
    assert header["modules_to_save"] == ["classifier"]
    loaded = ss.load_adapter(copy.deepcopy(base), out)
    assert torch.equal(logits(loaded, x), ref)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in m.named_parameters() if p.requires_grad}
    # saving again into our own folder overwrites
    ss.save_adapter(loaded, out)
    assert sorted(os.listdir(out)) == ["subspaces_adapter.json", "subspaces_adapter.safetensors"]


def test_native_round_trip_plain_model(tmp_path):
    m = plain()
    x = plain_inputs()
    ss.adapt_(m, "lora", rank=2, targets=["emb", "conv1", "conv2", "fc1"])
    randomize_adapters(m)
    ref = logits(m, x)
    ss.save_adapter(m, tmp_path / "p")
    loaded = ss.load_adapter(plain(), tmp_path / "p")
    assert torch.equal(logits(loaded, x), ref)


def test_save_without_adapter_errors(tmp_path):
    with pytest.raises(SubspacesError, match="no adapter"):
        ss.save_adapter(bert_seqcls(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_save_into_a_folder_with_foreign_files(tmp_path):
    _, m = trained_bert()
    d = tmp_path / "out"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    for fmt in ("native", "peft"):
        with pytest.raises(SubspacesError, match="notes.txt"):
            ss.save_adapter(m, d, format=fmt)
    assert os.listdir(d) == ["notes.txt"] and (d / "notes.txt").read_text() == "mine"
    assert os.listdir(tmp_path) == ["out"]  # no temp folder left behind
    with pytest.raises(SubspacesError, match="format"):
        ss.save_adapter(m, tmp_path / "x", format="onnx")


@pytest.fixture
def saved(tmp_path):
    _, m = trained_bert()
    return ss.save_adapter(m, tmp_path / "a")


def _load_fails(path, match):
    m = bert_seqcls()
    before, flags = state_snapshot(m), grad_flags(m)
    with pytest.raises(SubspacesError, match=match) as e:
        ss.load_adapter(m, path)
    assert str(path) in str(e.value)
    assert_untouched(m, before, flags)


def test_load_corrupted_safetensors(saved):
    f = saved / "subspaces_adapter.safetensors"
    f.write_bytes(b"\x00\x01garbage" * 10)
    _load_fails(saved, "safetensors")


def test_load_truncated_safetensors(saved):
    f = saved / "subspaces_adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    _load_fails(saved, None)


def test_load_garbage_json(saved):
    (saved / "subspaces_adapter.json").write_text("{not json")
    _load_fails(saved, "cannot read")


def test_load_json_of_wrong_shape(saved):
    (saved / "subspaces_adapter.json").write_text("[1, 2]")
    _load_fails(saved, None)
    (saved / "subspaces_adapter.json").write_text('{"format": "other"}')
    _load_fails(saved, "not a subspaces adapter")


def test_load_missing_folder(tmp_path):
    _load_fails(tmp_path / "nope", "does not exist")


def test_load_empty_folder(tmp_path):
    _load_fails(tmp_path, "holds no adapter")


def test_load_rank_mismatch_rolls_back(saved):
    f = saved / "subspaces_adapter.json"
    header = json.loads(f.read_text())
    last = list(header["modules"])[-1]
    header["modules"][last]["config"]["rank"] = 2  # the tensors are rank 4
    f.write_text(json.dumps(header))
    _load_fails(saved, "shape")


def test_load_onto_other_architecture(saved):
    m = llama_causal()
    before, flags = state_snapshot(m), grad_flags(m)
    with pytest.raises(SubspacesError, match="has no module"):
        ss.load_adapter(m, saved)
    assert_untouched(m, before, flags)


# -- low precision ------------------------------------------------------------------------------------------------

def test_bf16_adapt_forward_backward_fold():
    m = llama_causal().to(torch.bfloat16)
    ss.adapt_(m, "lora", rank=4, targets="all-linear")
    params = ss.adapter_parameters(m)
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(p.dtype == torch.bfloat16 for n, p in m.named_parameters() if "delta" not in n)
    x = ids()
    out = m(input_ids=x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for n, p in m.named_parameters() if "delta" not in n)
    torch.optim.SGD(params, lr=1.0).step()
    adapted = logits(m, x)
    ss.fold_(m)
    folded = logits(m, x)
    assert folded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert (folded.float() - adapted.float()).abs().max() < 0.1


def test_fold_equals_forward_on_torch_transformer_layer():
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    ss.adapt_(m, "lora", rank=2, targets="all-linear")
    randomize_adapters(m)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        adapted = m(x)
        ss.fold_(m)
        torch.testing.assert_close(m(x), adapted, atol=1e-5, rtol=0)


def test_unregistered_config_subclass_unknown_hyperparameter():
    import dataclasses

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MyLoRA(LoRA):
        pass

    with pytest.raises(SubspacesError, match="unknown hyperparameter.*rank"):
        ss.adapt_(bert_seqcls(), MyLoRA(rank=2), ranks=3, targets=QV)


# -- groups, shared tensors, truncation ----------------------------------------------------------------------

def test_each_adapt_call_is_a_group_saved_and_restored(tmp_path):
    base = llama_causal()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, targets=["q_proj"])
    ss.adapt_(m, "lora", rank=4, targets=["v_proj"])  # same config, separate call: a separate group
    groups = {n.rsplit(".", 1)[-1]: layer.delta.group for n, layer in adapted_layers(m)}
    assert groups == {"q_proj": 0, "v_proj": 1}
    ss.save_adapter(m, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "subspaces_adapter.json").read_text())
    assert {spec["group"] for spec in saved["modules"].values()} == {0, 1}
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert {n.rsplit(".", 1)[-1]: layer.delta.group for n, layer in adapted_layers(loaded)} == groups


def test_share_sees_the_whole_group_before_offsets():
    import dataclasses

    calls = []

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Recording(LoRA):
        def share(self, deltas, *, init):
            calls.append(([n for n, _ in deltas], init, [d.A.shape for _, d in deltas]))

    m = llama_causal()
    ss.adapt_(m, Recording(rank=2), targets=["q_proj", "v_proj"])
    names = [n for n, _ in adapted_layers(m)]
    assert calls == [(names, True, [torch.Size([2, 32])] * len(names))]


def test_truncate_needs_an_ordered_method_and_valid_ranks():
    with pytest.raises(SubspacesError, match="no adapter"):
        ss.truncate_(llama_causal(), rank=2)
    _, m = trained_bert()
    with pytest.raises(SubspacesError, match="no ordered rank"):
        ss.truncate_(m, rank=2)
    with pytest.raises(SubspacesError, match="not an adapted layer"):
        ss.truncate_(m, rank={"nope": 2})
    name = adapted_layers(m)[0][0]
    with pytest.raises(SubspacesError, match="positive integer"):
        ss.truncate_(m, rank={name: 0})
