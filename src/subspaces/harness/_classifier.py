"""Text classification on an encoder: mean pooling (how sentence encoders such as MiniLM were trained) and a
linear head named ``classifier``; tokenized examples and dynamic padding for the Trainer."""
from __future__ import annotations

import torch
from torch import nn


class MeanPoolClassifier(nn.Module):
    """``encoder`` (a Hugging Face AutoModel) -> masked mean of the last hidden state -> ``classifier``."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.classifier = nn.Linear(hidden, num_labels, dtype=encoder.dtype)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    def forward(self, input_ids=None, attention_mask=None, labels=None, features=None) -> dict[str, torch.Tensor]:
        """Logits (and the loss given labels); ``features`` (pooled, from ``pool``) skips the encoder."""
        logits = self.classifier(self.pool(input_ids, attention_mask) if features is None else features)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.float(), labels)
        return out


def encode(tokenizer, texts: list[str], labels: list[int], max_length: int) -> list[dict]:
    """Tokenize once; padding happens per batch (``collate``), so short texts cost little."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "labels": y} for ids, y in zip(enc["input_ids"], labels)]


class Collator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        if "features" in rows[0]:
            return {"features": torch.stack([r["features"] for r in rows]), "labels": labels}
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def embed(clf: MeanPoolClassifier, rows: list[dict], collate: Collator, device: torch.device, bf16: bool,
          batch_size: int = 64) -> list[dict]:
    """Pooled features of a frozen encoder, once per example (a linear probe needs nothing more)."""
    clf.to(device).eval()
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        b = collate(chunk)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pooled = clf.pool(b["input_ids"].to(device), b["attention_mask"].to(device)).float()
        out += [{"features": f.cpu(), "labels": r["labels"]} for f, r in zip(pooled, chunk)]
    return out
