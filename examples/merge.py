"""Merge: a tiny LLaMA pretrained on Python's documentation, fine-tuned on documentation (a) and on dialog (b),
merged by several methods; each merge is scored by its loss on both tasks (lower is better)."""
import copy
import tempfile

import torch
from transformers import AutoModelForCausalLM

import subspaces as ss

docs = torch.tensor(list(ss.data.pydoc_corpus()[:100_000].encode()))       # byte tokens
dialog = torch.tensor(list(" ".join(ss.data.load_task("chatterbot-topics").train_texts).encode()))
gen = torch.Generator().manual_seed(0)


def windows(text, n=8, length=64):
    starts = torch.randint(0, len(text) - length, (n,), generator=gen)
    return torch.stack([text[s:s + length] for s in starts])


def tune(model, text, steps=40, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        x = windows(text)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


tests = {"docs": windows(docs, 16), "dialog": windows(dialog, 16)}


@torch.no_grad()
def score(model, state_dict=None):
    if state_dict is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(state_dict)
    return ", ".join(f"{k} {model(input_ids=x, labels=x).loss.item():.2f}" for k, x in tests.items())


torch.manual_seed(0)
base = tune(ss.models.tiny_llama(hidden_size=64, intermediate_size=128), docs, steps=80)
a, b = tune(copy.deepcopy(base), docs), tune(copy.deepcopy(base), dialog)
tmp = tempfile.TemporaryDirectory()                        # removed when the script ends
for name, m in (("base", base), ("a", a), ("b", b)):
    m.save_pretrained(f"{tmp.name}/{name}")                 # Hugging Face folders, as users have them
print(f"base: {score(base)}\na: {score(a)}\nb: {score(b)}")

ss.merge("ties", base=f"{tmp.name}/base", models=[f"{tmp.name}/a", f"{tmp.name}/b"], density=0.2,
         out=f"{tmp.name}/merged")                           # a new Hugging Face folder, written atomically
print(f"ties (folders): {score(AutoModelForCausalLM.from_pretrained(f'{tmp.name}/merged'))}")
merged = ss.merge("dare_ties", base=base.state_dict(), models=[a.state_dict(), b.state_dict()], density=0.5,
                  seed=0)                                   # no out: a state dict
print(f"dare_ties: {score(base, merged)}")
learned = ss.merge("adamerging", base=base, models=[a.state_dict(), b.state_dict()],
                   data=[[windows(docs)] * 2, [windows(dialog)] * 2], steps=10)   # unlabelled batches per task
print(f"adamerging: {score(base, learned)}")
for step in ss.merge_stream("opcm", base=base, models=[a, b], alpha=0.5):      # constant memory, task by task
    print(f"opcm after {step.step} model(s): {score(base, step)}")

loras = []
for name, text in (("lora_a", docs), ("lora_b", dialog)):  # two PEFT LoRAs on the base, merged ...
    m = copy.deepcopy(base).train()
    ss.adapt_(m, "lora", targets="all-linear", rank=4, alpha=8)
    tune(m, text)
    loras.append(ss.save_adapter(m, f"{tmp.name}/{name}", format="peft"))
ss.merge("lora_svd", models=loras, rank=8, weights=[0.5, 0.5], out=f"{tmp.name}/lora_ab")  # ... into one
both = ss.load_adapter(copy.deepcopy(base), f"{tmp.name}/lora_ab")
print(f"lora_svd: {score(both)}")

small = tune(ss.models.tiny_llama(hidden_size=32, intermediate_size=64), docs, steps=80)
tuned_small = tune(copy.deepcopy(small), dialog)
fused = ss.merge("logit_fusion", base=base, models=[(tuned_small, small)])      # the large model steered per token
prompt = torch.tensor([list(b"Hello, how are")])
print("logit_fusion:", bytes(fused.generate(prompt, 16)[0].tolist()).decode(errors="replace"))
