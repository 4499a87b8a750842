"""Interoperability with the real ``peft`` package: our PEFT export loads in peft with the same logits, peft's
adapters import with the same logits, and one optimizer step from the same A/B agrees."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import bert_seqcls, ids, llama_causal, logits, plain, plain_inputs, randomize_adapters
from torch import nn

import subspaces as ss
from subspaces.adapters._core import adapted_layers

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

ATOL = 1e-5
QV = ["query", "value"]


def peft_load(base: nn.Module, path) -> nn.Module:
    """``PeftModel.from_pretrained`` that fails on peft's missing-keys warning and checks the load result."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, str(path)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    result = pm.load_adapter(str(path), adapter_name="check")  # a second copy, to read the load result
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    pm.set_adapter("default")
    return pm


def train_ours(m, x, steps=3, lr=1e-2, labels=None):
    opt = torch.optim.AdamW(ss.adapter_parameters(m), lr=lr)
    m.train()
    for _ in range(steps):
        out = m(input_ids=x, labels=labels if labels is not None else x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()


def train_peft(pm, x, steps=3, lr=1e-2, labels=None):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    for _ in range(steps):
        out = pm(input_ids=x, labels=labels if labels is not None else x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()


CLS_LABELS = torch.tensor([0, 2])


# (1) our export -> peft ----------------------------------------------------------------------------------------

def test_export_bert_seqcls_with_classifier(tmp_path):
    base = bert_seqcls()
    x = ids()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"])
    randomize_adapters(m)
    cls_before = m.classifier.weight.detach().clone()
    train_ours(m, x, labels=CLS_LABELS)
    assert not torch.equal(m.classifier.weight, cls_before)  # the head really trained
    ours = logits(m, x)
    ss.save_adapter(m, tmp_path / "a", format="peft")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["modules_to_save"] == ["classifier"]
    pm = peft_load(copy.deepcopy(base), tmp_path / "a")
    assert (logits(pm, x) - ours).abs().max() <= ATOL
    # without the trained head peft's output would differ: the classifier really travelled
    assert (logits(base, x) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("rslora", [False, True])
def test_export_llama_per_module_ranks(tmp_path, rslora):
    base = llama_causal()
    x = ids()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, alpha=8, rslora=rslora, targets="all-linear", exclude=["q_proj", "v_proj"])
    ss.adapt_(m, "lora", rank=2, alpha=3, rslora=rslora, targets=["q_proj", "v_proj"])
    randomize_adapters(m)
    ours = logits(m, x)
    ss.save_adapter(m, tmp_path / "a", format="peft")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is rslora
    assert len(cfg["rank_pattern"]) == 4 and set(cfg["rank_pattern"].values()) == {2}
    assert len(cfg["alpha_pattern"]) == 4 and set(cfg["alpha_pattern"].values()) == {3}
    assert "lm_head" not in cfg["target_modules"] and len(cfg["target_modules"]) == 14
    pm = peft_load(copy.deepcopy(base), tmp_path / "a")
    ranks = {n: mod.r["default"] for n, mod in pm.named_modules() if hasattr(mod, "lora_A") and "default" in mod.r}
    assert sorted(set(ranks.values())) == [2, 4]
    assert all(r == 2 for n, r in ranks.items() if n.endswith(("q_proj", "v_proj")))
    assert (logits(pm, x) - ours).abs().max() <= ATOL


def test_export_llama_embedding(tmp_path):
    base = llama_causal()
    x = ids()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, alpha=8, targets=["embed_tokens", "o_proj"])
    randomize_adapters(m)
    ours = logits(m, x)
    ss.save_adapter(m, tmp_path / "a", format="peft")
    pm = peft_load(copy.deepcopy(base), tmp_path / "a")
    assert (logits(pm, x) - ours).abs().max() <= ATOL
    back = ss.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert (logits(back, x) - ours).abs().max() <= ATOL


def test_export_plain_conv_and_embedding(tmp_path):
    base = plain()
    x = plain_inputs()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=2, alpha=4, targets=["emb", "conv1", "conv2", "fc1"])
    randomize_adapters(m)
    ours = logits(m, x)
    ss.save_adapter(m, tmp_path / "a", format="peft")
    pm = peft_load(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        assert (pm(*x) - ours).abs().max() <= ATOL


def test_export_gpt2_fan_in_fan_out(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    x = ids()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, alpha=8, targets=["c_attn", "c_fc"])
    randomize_adapters(m)
    ours = logits(m, x)
    ss.save_adapter(m, tmp_path / "a", format="peft")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft_load(copy.deepcopy(base), tmp_path / "a")
    assert (logits(pm, x) - ours).abs().max() <= ATOL
    back = ss.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert (logits(back, x) - ours).abs().max() <= ATOL


def test_export_mixed_rslora_as_plain_alphas(tmp_path):
    base = llama_causal()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=2, targets=["q_proj"])
    ss.adapt_(m, "lora", rank=2, rslora=True, alpha=3.0, targets=["v_proj"])
    randomize_adapters(m)
    ss.save_adapter(m, tmp_path / "a", format="peft")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["alpha_pattern"]  # s = alpha/sqrt(r) written as alpha' = s r
    x = ids()
    torch.testing.assert_close(logits(peft_load(base, tmp_path / "a"), x), logits(m, x), atol=1e-5, rtol=0)


# (2) peft -> our import ----------------------------------------------------------------------------------------

LLAMA_CONFIGS = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules="all-linear",
                     rank_pattern={"q_proj": 2, "model.layers.1.mlp.up_proj": 6},
                     alpha_pattern={"v_proj": 5, "o_proj": 3}),
    "dropout": dict(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["k_proj", "gate_proj"]),
}


@pytest.mark.parametrize("kind", list(LLAMA_CONFIGS))
def test_import_peft_trained_llama(tmp_path, kind):
    base = llama_causal()
    x = ids()
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**LLAMA_CONFIGS[kind]))
    train_peft(pm, x)
    assert any(p.abs().sum() > 0 for n, p in pm.named_parameters() if "lora_B" in n)
    ref = logits(pm, x)
    assert (ref - logits(base, x)).abs().max() > 1e-3
    pm.save_pretrained(str(tmp_path / "p"))
    m = ss.load_adapter(copy.deepcopy(base), tmp_path / "p")
    assert (logits(m, x) - ref).abs().max() <= ATOL
    n_peft = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == n_peft
    if kind == "patterns":
        ranks = {n: layer.delta.A.shape[0] for n, layer in adapted_layers(m)}
        assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.mlp.up_proj"] == 6
        assert ranks["model.layers.0.mlp.up_proj"] == 4
        alphas = {n: layer.delta.config.alpha for n, layer in adapted_layers(m)}
        assert alphas["model.layers.1.self_attn.v_proj"] == 5 and alphas["model.layers.0.self_attn.o_proj"] == 3
        assert alphas["model.layers.0.mlp.down_proj"] == 8


def test_import_peft_trained_bert_seqcls(tmp_path):
    base = bert_seqcls()
    x = ids()
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                        target_modules=["query", "value"]))
    train_peft(pm, x, labels=CLS_LABELS)
    ref = logits(pm, x)
    pm.save_pretrained(str(tmp_path / "p"))
    m = ss.load_adapter(copy.deepcopy(base), tmp_path / "p")
    assert (logits(m, x) - ref).abs().max() <= ATOL
    assert {n for n, p in m.named_parameters() if p.requires_grad and "delta" not in n} == \
        {"classifier.weight", "classifier.bias"}
    # and back out again: our re-export loads in peft with the same logits
    ss.save_adapter(m, tmp_path / "again", format="peft")
    pm2 = peft_load(copy.deepcopy(base), tmp_path / "again")
    assert (logits(pm2, x) - ref).abs().max() <= ATOL


def _peft_folder(tmp_path, **kw):
    base = llama_causal()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], **kw))
    pm.save_pretrained(str(tmp_path / "p"))
    return base, tmp_path / "p"


def _import_fails(base, path, match):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(ss.SubspacesError, match=match):
        ss.load_adapter(base, path)
    assert not adapted_layers(base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags


def test_import_dora_is_refused(tmp_path):
    base, path = _peft_folder(tmp_path, use_dora=True)
    assert json.loads((path / "adapter_config.json").read_text())["use_dora"] is True
    _import_fails(base, path, "use_dora")


def test_import_bias_is_refused(tmp_path):
    base, path = _peft_folder(tmp_path, bias="all")
    _import_fails(base, path, "bias")


@pytest.mark.parametrize("key,value", [("alora_invocation_tokens", [5, 6]), ("trainable_token_indices", [3]),
                                       ("layer_replication", [[0, 2]]), ("lora_bias", True),
                                       ("use_qalora", True)])
def test_import_other_unsupported_features_are_refused(tmp_path, key, value):
    base, path = _peft_folder(tmp_path)
    f = path / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), key: value}))
    _import_fails(base, path, key)


def test_import_without_safetensors_is_refused(tmp_path):
    base, path = _peft_folder(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    _import_fails(base, path, "missing")


def test_import_other_peft_type_is_refused(tmp_path):
    base, path = _peft_folder(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    _import_fails(base, path, "LORA")


# (3) one optimizer step from the same A/B -------------------------------------------------------------------------

def _pairs(pm, m):
    """(peft lora_A, our A) and (peft lora_B, our B) for each adapted module, matched by name."""
    ours = dict(adapted_layers(m))
    pairs = []
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            pairs.append((mod.lora_A["default"].weight, ours[name].delta.A))
            pairs.append((mod.lora_B["default"].weight, ours[name].delta.B))
    assert len(pairs) == 2 * len(ours)
    return pairs


@pytest.mark.parametrize("start", ["peft-init", "random"])
@pytest.mark.parametrize("model", ["llama", "bert"])
def test_one_adamw_step_matches_peft(model, start):
    if model == "llama":
        base, targets, labels = llama_causal(), "all-linear", None
        extra, task = {}, {}
    else:  # peft's SEQ_CLS task puts the classifier in modules_to_save; we name it
        base, targets, labels = bert_seqcls(), ["query", "value"], CLS_LABELS
        extra, task = {"modules_to_save": ["classifier"]}, {"task_type": "SEQ_CLS"}
    x = ids()
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **task))
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, alpha=8, targets=targets, **extra)
    pairs = _pairs(pm, m)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for theirs, ours in pairs:
            if start == "random":
                theirs.copy_(torch.randn(theirs.shape, generator=g) * 0.1)
            ours.copy_(theirs)
    torch.testing.assert_close(logits(m, x), logits(pm, x), atol=1e-6, rtol=0)
    n_ours = sum(p.numel() for p in ss.adapter_parameters(m))
    assert n_ours == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    train_peft(pm, x, steps=1, labels=labels)
    train_ours(m, x, steps=1, labels=labels)
    for theirs, ours in pairs:
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert any(not torch.equal(ours, torch.zeros_like(ours)) for theirs, ours in pairs[1::2])  # B moved
    if model == "bert":
        torch.testing.assert_close(m.classifier.weight,
                                   pm.base_model.model.classifier.modules_to_save["default"].weight,
                                   atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(m, x), logits(pm, x), atol=1e-6, rtol=0)


def test_export_lora_loads_in_peft(tmp_path):
    base = bert_seqcls()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, targets=QV, modules_to_save=["classifier"])
    randomize_adapters(m)
    report = ss.export_lora(m, tmp_path / "e", rank=2)
    assert all(r["rank"] == 2 and 0 < r["relative_error"] < 1 for r in report)
    pm = peft_load(copy.deepcopy(base), tmp_path / "e")
    ours = ss.load_adapter(copy.deepcopy(base), tmp_path / "e")
    x = ids()
    torch.testing.assert_close(logits(pm, x), logits(ours, x), atol=1e-5, rtol=0)
