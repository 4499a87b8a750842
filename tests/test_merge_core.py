"""The merge core: lazy inputs, streamed sharded output, atomic folders, clear errors, the mergekit YAML reader."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import subspaces as ss
import subspaces.merge._io as mio
import subspaces.merge._shards as shards
from subspaces._errors import SubspacesError
from subspaces.integrations.mergekit import from_mergekit


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(8, 4, generator=g), "a.bias": torch.randn(8, generator=g),
            "b.weight": torch.randn(3, 8, generator=g), "pos": torch.arange(6)}


def hf_folder(path, sd, shards: int = 1):
    """A Hugging Face-style folder: config, tokenizer file, one file or a sharded index."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    (path / "tokenizer.json").write_text("{}")
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"))
        return path
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        part = {k: sd[k] for k in keys[i::shards]}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def folders(tmp_path):
    base = state(0)
    models = [{k: v + 0.1 * state(s)[k] if v.is_floating_point() else v for k, v in base.items()} for s in (1, 2)]
    return (hf_folder(tmp_path / "base", base, shards=2), [hf_folder(tmp_path / f"m{i}", m) for i, m in
                                                            enumerate(models)], base, models)


def test_folders_sharded_in_and_out_equal_in_memory(folders, tmp_path):
    base_dir, model_dirs, base, models = folders
    want = ss.merge("ties", base=base, models=models, density=0.5)
    out = ss.merge("ties", base=base_dir, models=model_dirs, density=0.5, out=tmp_path / "merged", shard_bytes=100)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-00003.safetensors" in files
    assert {"config.json", "tokenizer.json", "merge_config.json"} <= set(files)
    got = ss.merge.load_state_dict(out)
    assert list(got) == list(ss.merge.open_model(base_dir).keys())
    for k in want:
        assert torch.equal(got[k], want[k]), k
    cfg = json.loads((out / "merge_config.json").read_text())
    assert cfg["method"] == "ties" and cfg["hyperparameters"]["density"] == 0.5 and len(cfg["models"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary folder left


def test_output_loads_with_safetensors_and_dtype_recorded(folders, tmp_path):
    from safetensors.torch import load_file

    base_dir, model_dirs, _, _ = folders
    out = ss.merge("task_arithmetic", base=base_dir, models=model_dirs, dtype="bfloat16", out=tmp_path / "o")
    sd = load_file(str(out / "model.safetensors"))
    assert sd["a.weight"].dtype == torch.bfloat16 and sd["pos"].dtype == torch.int64
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_streaming_writes_each_tensor_before_computing_the_next(folders, tmp_path, monkeypatch):
    base_dir, model_dirs, _, _ = folders
    events = []
    real_bytes, real_get = shards._tensor_bytes, mio._Safetensors.get
    monkeypatch.setattr(shards, "_tensor_bytes", lambda t: (events.append("write"), real_bytes(t))[1])
    monkeypatch.setattr(mio._Safetensors, "get", lambda self, k: (events.append("read"), real_get(self, k))[1])
    ss.merge("task_arithmetic", base=base_dir, models=model_dirs, out=tmp_path / "o")
    # each float tensor: 3 reads (base + 2 models) then its write, the int one 1 read; never all reads first
    assert re.fullmatch(r"((rrr|r)w){4}", "".join(e[0] for e in events)), events
    assert events.count("read") == 10


def test_failure_leaves_nothing(folders, tmp_path, monkeypatch):
    base_dir, model_dirs, _, _ = folders
    calls, real_bytes = [], shards._tensor_bytes

    def boom(t):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_bytes(t)

    monkeypatch.setattr(shards, "_tensor_bytes", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ss.merge("task_arithmetic", base=base_dir, models=model_dirs, out=tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "m0", "m1"]


def test_errors_name_the_problem(folders, tmp_path):
    base_dir, model_dirs, base, models = folders
    bad = dict(models[0])
    bad["a.weight"] = torch.zeros(8, 5)
    with pytest.raises(SubspacesError, match=r"tensor 'a.weight' has shape \[8, 5\] in model 0"):
        ss.merge("task_arithmetic", base=base, models=[bad, models[1]])
    missing = {k: v for k, v in models[0].items() if k != "b.weight"}
    with pytest.raises(SubspacesError, match="model 0 lacks tensor 'b.weight'"):
        ss.merge("task_arithmetic", base=base, models=[missing])
    extra = {**models[0], "c": torch.zeros(1)}
    with pytest.raises(SubspacesError, match="has tensor 'c'"):
        ss.merge("task_arithmetic", base=base, models=[extra])
    half = {k: v.half() if v.is_floating_point() else v for k, v in models[0].items()}
    with pytest.raises(SubspacesError, match="mixed dtypes.*pass dtype="):
        ss.merge("task_arithmetic", base=base, models=[half])
    assert ss.merge("task_arithmetic", base=base, models=[half], dtype="float32")["a.weight"].dtype == torch.float32
    with pytest.raises(SubspacesError, match="needs a base model"):
        ss.merge("ties", models=models)
    with pytest.raises(SubspacesError, match="unknown merge method 'tie'.*Did you mean 'ties'"):
        ss.merge("tie", base=base, models=models)
    with pytest.raises(SubspacesError, match="weights has 3 values for 2 models"):
        ss.merge("task_arithmetic", base=base, models=models, weights=[1, 2, 3])
    with pytest.raises(SubspacesError, match="already exists"):
        ss.merge("task_arithmetic", base=base, models=models, out=base_dir)
    with pytest.raises(SubspacesError, match="does not exist"):
        ss.merge("task_arithmetic", base=tmp_path / "nope", models=models)
    with pytest.raises(SubspacesError, match="device='nowhere' is not usable"):
        ss.merge("task_arithmetic", base=base, models=models, device="nowhere")
    with pytest.raises(SubspacesError, match="models is empty"):
        ss.merge("task_arithmetic", base=base, models=[])


def test_pickled_checkpoints_are_refused(tmp_path):
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SubspacesError, match="pickled checkpoints are never loaded"):
        ss.merge.open_model(tmp_path / "pt")
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(SubspacesError, match="only .safetensors"):
        ss.merge.open_model(tmp_path / "w.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(SubspacesError, match="not a valid safetensors file"):
        ss.merge.open_model(tmp_path / "bad.safetensors")


def test_modules_are_inputs_too():
    lin = torch.nn.Linear(3, 2)
    out = ss.merge("linear", models=[lin, lin])
    assert torch.allclose(out["weight"], lin.weight.detach())


def test_mergekit_yaml_reader():
    cfg = {"merge_method": "dare_ties", "base_model": "b", "dtype": "bfloat16",
           "parameters": {"int8_mask": True, "lambda": 0.5},
           "models": [{"model": "b"}, {"model": "x", "parameters": {"weight": 0.7, "density": 0.3}},
                      {"model": "y", "parameters": {"weight": 0.3}}]}
    kw = from_mergekit(cfg)
    assert kw == {"method": "dare_ties", "base": "b", "models": ["x", "y"], "dtype": "bfloat16", "density": [0.3, 1.0],
                  "weights": [0.7, 0.3], "normalize": False, "rescale": "l1", "scaling": 0.5}
    with pytest.raises(SubspacesError, match="unknown key 'slices'"):
        from_mergekit({**cfg, "slices": []})
    with pytest.raises(SubspacesError, match="merge_method 'slerp'.*Valid: breadcrumbs, dare_linear"):
        from_mergekit({**cfg, "merge_method": "slerp"})
    with pytest.raises(SubspacesError, match="unknown key 'densty'.*Did you mean 'density'"):
        from_mergekit({**cfg, "models": [{"model": "x", "parameters": {"densty": 0.3}}]})
    with pytest.raises(SubspacesError, match="needs a 'weight'"):
        from_mergekit({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "x"}]})


@pytest.mark.parametrize("method, hp", [("ties", {"density": [0.3, 0.6], "weights": [1.0, 0.5]}),
                                        ("ties", {"density": 0.2, "consensus": "count", "normalize": False}),
                                        ("task_arithmetic", {"scaling": 0.4}), ("linear", {})])
def test_blocks_of_rows_give_the_same_tensors(folders, tmp_path, monkeypatch, method, hp):
    """Large tensors are merged in blocks of rows (here: every tensor, 5 entries a block) with whole-tensor
    statistics first; the result equals the whole-tensor merge bit for bit."""
    import subspaces.merge._core as core

    base_dir, model_dirs, base, models = folders
    want = ss.merge(method, base=base, models=models, **hp)
    monkeypatch.setattr(core, "BLOCK_ELEMENTS", 5)
    got = ss.merge.load_state_dict(ss.merge(method, base=base_dir, models=model_dirs, out=tmp_path / "o", **hp))
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_streamed_kth_largest_equals_kthvalue():
    from subspaces.merge._sparsify import kth_largest_abs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g) * torch.logspace(-8, 2, 10_000)
    x[::7] = 0.0
    x[1:5] = 3.25  # ties
    blocks = lambda: ([b] for b in x.split(333))  # noqa: E731
    for k in (1, 2, 5, 137, 4321, 10_000):
        assert kth_largest_abs(blocks, [k]) == [x.abs().kthvalue(10_000 - k + 1).values.item()], k
