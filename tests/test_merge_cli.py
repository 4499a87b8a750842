"""`subspaces merge CONFIG.yml OUT`: a mergekit YAML over tiny LLaMA folders gives a loadable Hugging Face folder equal
to the Python API's merge; bad input exits 2 with a one-line error and nothing written."""
from __future__ import annotations

import pytest
import torch
import yaml
from test_cli import cli

import subspaces as ss


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    paths = []
    for i in range(3):
        m = ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=0)
        if i:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        m.save_pretrained(root / f"m{i}")
        paths.append(root / f"m{i}")
    return paths


def config(tmp_path, llamas, **over):
    cfg = {"merge_method": "ties", "base_model": str(llamas[0]), "dtype": "float32",
           "parameters": {"normalize": True},
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in llamas[1:]]}
    cfg.update(over)
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_merge_cli_writes_a_loadable_folder(tmp_path, llamas):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    r = cli("merge", config(tmp_path, llamas), out, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert {"model.safetensors", "config.json", "merge_config.json", "mergekit_config.yml"} <= {
        p.name for p in out.iterdir()}
    want = ss.merge("ties", base=llamas[0], models=llamas[1:], density=0.5, weights=[1.0, 1.0])
    model = AutoModelForCausalLM.from_pretrained(out)
    got = model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("case, message", [
    ({"merge_method": "slerp"}, "merge_method 'slerp'"),
    ({"tokenizer_source": "base"}, "unknown key 'tokenizer_source'"),
    ({"base_model": None}, "ties needs a base model"),
    ({"base_model": "/no/such/model"}, "does not exist"),
])
def test_merge_cli_bad_config_exits_2(tmp_path, llamas, case, message):
    out = tmp_path / "merged"
    r = cli("merge", config(tmp_path, llamas, **case), out)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml"]


def test_merge_cli_refuses_mismatched_models_and_existing_output(tmp_path, llamas):
    other = ss.models.tiny_llama(hidden_size=32, intermediate_size=48, num_attention_heads=4, seed=0)
    other.save_pretrained(tmp_path / "other")
    cfg = config(tmp_path, llamas, models=[{"model": str(tmp_path / "other"), "parameters": {"weight": 1.0}}])
    r = cli("merge", cfg, tmp_path / "merged")
    assert r.returncode == 2 and "tensor 'model.layers.0.mlp.down_proj.weight' has shape" in r.stderr, r.stderr
    assert not (tmp_path / "merged").exists()
    (tmp_path / "taken").mkdir()
    r = cli("merge", config(tmp_path, llamas), tmp_path / "taken")
    assert r.returncode == 2 and "already exists" in r.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [unclosed")
    r = cli("merge", bad, tmp_path / "merged")
    assert r.returncode == 2 and "cannot read" in r.stderr
