"""Train: the tiny LLaMA pretrained from scratch on Python's documentation, with GaLore and with DCT."""
import torch

import subspaces as ss

text = torch.tensor(list(ss.data.pydoc_corpus()[:200_000].encode()))   # byte tokens (vocabulary 256)
gen = torch.Generator().manual_seed(0)


def batch(size: int = 8, length: int = 64) -> torch.Tensor:
    starts = torch.randint(0, len(text) - length, (size,), generator=gen)
    return torch.stack([text[s:s + length] for s in starts])


def train(model, opt, steps: int = 30) -> float:
    for _ in range(steps):
        x = batch()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


model = ss.models.tiny_llama()                              # byte vocabulary, hidden 256, 2 layers
opt = ss.optim.Projected(model.parameters(), torch.optim.AdamW, lr=1e-2,     # any inner torch optimizer
                         projector=ss.optim.GaLore(rank=64, update_every=20, scale=0.25))
print(f"galore: loss {train(model, opt):.3f}, optimizer state {ss.optim.state_bytes(opt) / 2**20:.2f} MB "
      f"(formula: {ss.optim.expected_state_bytes(opt) / 2**20:.2f} MB)")   # measured optimizer state and the formula

model = ss.models.tiny_llama()
opt = ss.optim.setup_(model, "dct", lr=1e-2, rank=64)      # any train method; reparameterizes the model if it must
print(f"dct: loss {train(model, opt):.3f}, optimizer state {ss.optim.state_bytes(opt) / 2**20:.2f} MB")
