"""extract_lora / `subspaces extract-lora`: a full-rank extraction reproduces the fine-tuned model through PEFT and
ss.load_adapter, whitening beats plain SVD on output error for the calibration inputs, and bad input exits 2 with
nothing written."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import ids, llama_causal, logits
from test_cli import cli

import subspaces as ss
from subspaces.merge import extract_lora
from subspaces.merge._lora import PREFIX


def finetune(base, seed=0, std=0.05, only=None):
    """A copy of ``base`` with every targeted Linear (all but lm_head, or names ending in ``only``) perturbed."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in ft.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head" and (only is None or name.endswith(only)):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * std)
    return ft


def test_full_rank_reproduces_the_finetuned_model(tmp_path):
    from peft import PeftModel

    base = llama_causal()
    ft = finetune(base)
    out = tmp_path / "lora"
    result = extract_lora(base, ft, rank=64, out=out)
    assert len(result.report) == 14 and max(r["weight_error"] for r in result.report) < 1e-5
    x = ids()
    want = logits(ft, x)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    torch.testing.assert_close(logits(pm, x), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(ss.load_adapter(copy.deepcopy(base), out), x), want, atol=1e-4, rtol=1e-4)
    info = json.loads((out / "extract_lora.json").read_text())
    assert info["whitened"] is False and info["not_captured"] == []


def layer_inputs(model, names, batches):
    seen = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in names]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def test_whitened_beats_plain_on_the_calibration_outputs():
    base = llama_causal()
    ft = finetune(base, seed=1)
    calib = [ids(batch=4, length=16, seed=s) for s in range(3)]
    plain = extract_lora(base, ft, rank=4)
    white = extract_lora(base, ft, rank=4, calibration=calib)
    names = [r["name"] for r in plain.report]
    X = layer_inputs(ft, names, calib)
    mods, ft_mods = dict(base.named_modules()), dict(ft.named_modules())
    ratios = []
    for row in white.report:
        n = row["name"]
        dW = (ft_mods[n].weight - mods[n].weight).detach().double()

        def err(res):
            A = res.state_dict[f"{PREFIX}{n}.lora_A.weight"].double()
            B = res.state_dict[f"{PREFIX}{n}.lora_B.weight"].double()
            return float(((dW - B @ A) @ X[n].T).norm().detach())

        e_white, e_plain = err(white), err(plain)
        assert e_white <= e_plain * (1 + 1e-6)  # optimal for these inputs: never worse
        assert row["output_error"] == pytest.approx(e_white / float((dW @ X[n].T).norm()), rel=1e-3)
        ratios.append(e_white / e_plain)
    assert sum(ratios) / len(ratios) < 0.95
    # and the whole model is closer to the fine-tuned one on the calibration text
    def model_error(res):
        m = ss.load_adapter(copy.deepcopy(base), _save(res))
        return sum(float((logits(m, b) - logits(ft, b)).square().mean()) for b in calib)

    assert model_error(white) < model_error(plain)


def _save(res):
    import tempfile

    from subspaces.merge._lora import write_peft

    path = tempfile.mkdtemp()
    return write_peft(f"{path}/a", res)


def test_unchanged_layers_are_left_out_and_other_changes_are_reported(tmp_path):
    base = llama_causal()
    ft = finetune(base, only="q_proj")
    with torch.no_grad():
        ft.model.norm.weight.add_(0.1)
    with pytest.warns(UserWarning, match="model.norm.weight"):
        result = extract_lora(base, ft, rank=2, targets=["q_proj", "k_proj"], out=tmp_path / "o")
    assert result.config["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert sum(1 for r in result.report if r.get("unchanged")) == 2
    assert json.loads((tmp_path / "o" / "extract_lora.json").read_text())["not_captured"] == ["model.norm.weight"]
    with pytest.raises(ss.SubspacesError, match="equals the base"):
        extract_lora(base, copy.deepcopy(base), rank=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import AutoTokenizer

    from subspaces.models import minilm_path, tiny_llama

    tok = AutoTokenizer.from_pretrained(minilm_path())
    root = tmp_path_factory.mktemp("extract")
    kw = dict(vocab_size=len(tok), intermediate_size=64, num_attention_heads=4, seed=0)
    base = tiny_llama(hidden_size=32, **kw)
    for name, model in (("base", base), ("ft", finetune(base, seed=2)), ("wide", tiny_llama(hidden_size=64, **kw))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "calib.txt").write_text("Low-rank adapters add a product of two thin matrices to a weight. " * 40)
    return root


def test_cli_whitened_full_rank_loads_in_peft(folders, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    r = cli("extract-lora", "--base", folders / "base", "--finetuned", folders / "ft", "--rank", "64", "--whiten",
            "--calibration-texts", folders / "calib.txt", "--calib-samples", "4", "--seq-len", "16",
            "--device", "cpu", out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "extract_lora.json").read_text())["whitened"] is True
    x = ids()
    base = AutoModelForCausalLM.from_pretrained(folders / "base").eval()
    want = logits(AutoModelForCausalLM.from_pretrained(folders / "ft").eval(), x)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, str(out)).eval(), x), want, atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--finetuned", "{ft}", "--rank", "0"], "--rank 0"),
    (["--finetuned", "{ft}", "--rank", "2", "--calibration-texts", "{calib}"], "only with --whiten"),
    (["--finetuned", "{wide}", "--rank", "2"], "same architecture"),
    (["--finetuned", "{root}/missing", "--rank", "2"], "config.json"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(folders, tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "lora"
    fill = {"ft": folders / "ft", "wide": folders / "wide", "calib": folders / "calib.txt", "root": folders}
    argv = ["extract-lora", "--base", folders / "base", *[a.format(**fill) for a in args], "--device", "cpu", out]
    code, err = run_main(monkeypatch, capsys, argv)
    assert code == 2 and message.lower() in err.lower(), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir()]  # no temporary folder left behind either


def test_cli_refuses_an_existing_output(folders, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lora"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    argv = ["extract-lora", "--base", folders / "base", "--finetuned", folders / "ft", "--rank", "2", out]
    code, err = run_main(monkeypatch, capsys, argv)
    assert code == 2 and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def run_main(monkeypatch, capsys, argv) -> tuple[int, str]:
    """`subspaces ...` in process (the subprocess path is tested above): exit code and stderr."""
    from subspaces.cli import main

    monkeypatch.setattr(sys, "argv", ["subspaces", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err
