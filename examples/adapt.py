"""Adapt: LoRA on the embedded MiniLM, a few steps on the docstring task; save, export, fold, reload."""
import tempfile

import torch

import subspaces as ss

task = ss.data.load_task("docstring")                      # stdlib docstrings -> their package
torch.manual_seed(0)
model, tok = ss.models.load_minilm(num_labels=task.num_labels)
batch = tok(task.train_texts[:16], padding=True, truncation=True, max_length=64, return_tensors="pt")
labels = torch.tensor(task.train_labels[:16])

for row in ss.inspect_targets(model, ["query", "value"])[:2]:   # dry run: matched modules, shapes, parameters
    print(row)
ss.adapt_(model, "lora", targets=["query", "value"], rank=8, alpha=16, modules_to_save=["classifier"])
opt = torch.optim.AdamW(ss.adapter_parameters(model), lr=1e-3)
for step in range(5):                                       # train as usual (or with the Hugging Face Trainer)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
print(f"loss after 5 steps: {loss.item():.3f}")

model.eval()
tmp = tempfile.TemporaryDirectory()                        # removed when the script ends
out = tmp.name
ss.save_adapter(model, f"{out}/native")                     # subspaces_adapter.{json,safetensors}
ss.save_adapter(model, f"{out}/peft", format="peft")        # adapter_model.safetensors + adapter_config.json
report = ss.export_lora(model, f"{out}/served", rank=4)     # any foldable adapter as a plain PEFT LoRA (+ error)
print(f"rank-4 export, largest relative error: {max(r['relative_error'] for r in report):.2e}")
with torch.no_grad(), ss.adapters_disabled(model):
    base_logits = model(**batch).logits
ss.fold_(model)                                             # W += ΔW; exactly the original state-dict keys
with torch.no_grad():
    folded_logits = model(**batch).logits

torch.manual_seed(0)
other, _ = ss.models.load_minilm(num_labels=task.num_labels)
ss.load_adapter(other, f"{out}/peft")                       # reads both formats (PEFT LoRA included)
with torch.no_grad():
    assert torch.allclose(other.eval()(**batch).logits, folded_logits, atol=1e-5)
print(f"the adapter moved the logits by {(folded_logits - base_logits).abs().max():.3f}; reloaded: identical")
print(len(ss.list_methods()), "methods; the first:", ss.list_methods()[0])   # family | name | paper | status
