"""Every adapter runs on each available device and dtype as on CPU fp32: adapt, train a step, fold, save/load.
On a machine with CUDA the cuda cases run too (the GPU check runs this file there)."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ids, llama_causal
from test_conformance import config_for

import subspaces as ss
import subspaces.compress  # noqa: F401  (registers the compress methods)
import subspaces.optim  # noqa: F401
from subspaces._registry import ADAPTERS, COMPRESS, TRAIN

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("method", [e.name for e in ADAPTERS.entries()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_adapter_on_device_and_dtype(method, dtype, device, tmp_path):
    model = llama_causal().to(device=device, dtype=dtype)
    x = ids().to(device)
    ss.adapt_(model, config_for(method), targets="all-linear")
    for p in ss.adapter_parameters(model):
        assert p.device.type == device and p.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    opt = torch.optim.AdamW(ss.adapter_parameters(model), lr=1e-2)
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        adapted = model(input_ids=x).logits.float()
    ss.save_adapter(model, tmp_path / "a")
    reloaded = copy.deepcopy(model)
    ss.unadapt_(reloaded)
    ss.load_adapter(reloaded, tmp_path / "a")
    ss.fold_(model)
    with torch.no_grad():
        folded = model(input_ids=x).logits.float()
        again = reloaded(input_ids=x).logits.float()
    assert folded.dtype == torch.float32 and model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    torch.testing.assert_close(again, adapted, rtol=0, atol=1e-6)
    scale = adapted.abs().max().item()
    assert (folded - adapted).abs().max().item() <= TOL[dtype] * max(1.0, scale)


@pytest.mark.parametrize("method", [e.name for e in TRAIN.entries()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_train_method_on_device_and_dtype(method, dtype, device):
    from test_optim_conformance import LR, OVERRIDES, model as tiny

    model = tiny().to(device=device, dtype=dtype)
    opt = ss.optim.setup_(model, method, lr=LR.get(method, 1e-2), **OVERRIDES.get(method, {}))
    x = ids().to(device) % 256
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert {p.device.type for p in model.parameters()} == {device}
    assert {p.dtype for p in model.parameters()} == {dtype}


@pytest.mark.parametrize("method", [e.name for e in COMPRESS.entries()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_compress_method_on_device_and_dtype(method, dtype, device):
    from test_compress_conformance import MODEL_LEVEL, batches, model as tiny

    model = tiny(dtype).to(device)
    data = [b.to(device) for b in batches()]
    settings = MODEL_LEVEL.get(method, {"method": {}, "budget": {"ratio": 0.3}})
    config = ss.compress.config_for(method, settings["method"])
    ss.compress_(model, config, calibration=data, **settings["budget"])
    with torch.no_grad():
        out = model(data[0]).logits
    assert torch.isfinite(out.float()).all() and out.device.type == device
    assert {p.device.type for p in model.parameters()} == {device}
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} <= {dtype, torch.float32}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "model_stock"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_tensor_merge_on_device_and_dtype(method, dtype, device):
    """The arithmetic runs on ``device`` in float32; the merged tensors match the CPU merge and keep the dtype."""
    import subspaces.merge  # noqa: F401

    base = {k: v.to(dtype) for k, v in llama_causal(0).state_dict().items()}
    models = [{k: v.to(dtype) for k, v in llama_causal(s).state_dict().items()} for s in (1, 2, 3)]
    hp = {"density": 0.5} if method in ("ties", "dare_ties", "breadcrumbs") else {}
    on_device = ss.merge(method, base=base, models=models, device=device, **hp)
    on_cpu = ss.merge(method, base=base, models=models, **hp)
    for k, v in on_cpu.items():
        assert on_device[k].dtype == dtype and on_device[k].device.type == "cpu"
        if method != "dare_ties":  # CUDA draws other random masks than the CPU
            torch.testing.assert_close(on_device[k].float(), v.float(), rtol=0, atol=TOL[dtype])
