"""Shared tiny models for the adapter tests: random-init, fp32, fixed seeds, dropout off."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

# The test models are tiny: one intra-op thread avoids OpenMP spin-waits, which made the suite ~8x slower on a
# busy 2-core machine. Set OMP_NUM_THREADS to override.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

VOCAB = 100


def bert_seqcls(seed: int = 0, num_labels: int = 3) -> nn.Module:
    """Tiny random BertForSequenceClassification (hidden 32, 2 layers, 2 heads), eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).float().eval()


def llama_causal(seed: int = 0) -> nn.Module:
    """Tiny random LlamaForCausalLM (hidden 32, 2 layers, 4 heads, 2 kv heads), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float().eval()


class Plain(nn.Module):
    """A small plain-torch model touching every layer type LoRA supports: Embedding, Conv1d, Conv2d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.conv1 = nn.Conv1d(16, 12, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
        self.fc1 = nn.Linear(12 + 8, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2)              # (N, 16, L)
        h = self.conv1(h).mean(-1)                     # (N, 12)
        g = self.conv2(img).mean((-2, -1))             # (N, 8)
        return self.fc2(torch.relu(self.fc1(torch.cat([h, g], -1))))


def plain(seed: int = 0) -> Plain:
    torch.manual_seed(seed)
    return Plain().float().eval()


def ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def plain_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 9), generator=g), torch.randn(2, 3, 10, 10, generator=g)


def logits(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(x, tuple):
            return model(*x)
        return model(input_ids=x).logits


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter tensor a nonzero random value so tests see the branch."""
    from subspaces.adapters._core import DELTA, adapted_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for p in layer._modules[DELTA].parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def with_spectrum(S: list[float], d_out: int = 10, d_in: int = 14, seed: int = 0) -> nn.Linear:
    """A Linear whose weight has exactly the singular values ``S`` (descending)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d_out, len(S), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, len(S), generator=g, dtype=torch.float64)).Q
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_((U * torch.tensor(S, dtype=torch.float64)) @ V.T)
    return lin


def assert_stored_once(model: nn.Module, resolve, n: int) -> None:
    """Frozen tensors shared across layers (``AdapterConfig.share``) are ``n`` buffers registered once each, the
    ones every layer computes with (``resolve(model)``), in one dtype — also in a deepcopy (its own tensors) and
    after ``model.to(torch.float64)`` (outputs kept to 1e-6)."""
    def check(m: nn.Module, dtype: torch.dtype) -> set[int]:
        bufs = [b for name, b in m.named_buffers(remove_duplicate=False) if ".delta." in name]
        ptrs = {b.data_ptr() for b in bufs}
        assert len(bufs) == len(ptrs) == n  # registered once per key, not once per layer
        tensors = resolve(m)
        assert {t.data_ptr() for t in tensors} == ptrs and all(t.dtype == dtype for t in tensors)
        return ptrs

    x = ids()
    ref = logits(model, x)
    before = check(model, torch.float32)
    twin = copy.deepcopy(model)
    assert check(twin, torch.float32).isdisjoint(before)  # the copy shares its own tensors
    assert torch.equal(logits(twin, x), ref)
    model.to(torch.float64)
    check(model, torch.float64)
    torch.testing.assert_close(logits(model, x).float(), ref, atol=1e-6, rtol=0)


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grad_flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.fixture
def tiny_bert():
    return bert_seqcls()


@pytest.fixture
def tiny_llama():
    return llama_causal()


@pytest.fixture
def tiny_plain():
    return plain()


@pytest.fixture
def clone():
    return copy.deepcopy


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_lm_folder(path, seed: int = 0):
    """A tiny random LLaMA saved as a Hugging Face folder with a byte-level BPE tokenizer of its own (vocabulary
    ~300, trained in a second on digits and words, with eos, pad and a chat template): for causal-LM runs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import subspaces as ss

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = [r["prompt"] + r["completion"] for r in ss.data.arithmetic_task().train[:200]]
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    ss.models.tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
                         ).save_pretrained(path)
    tok.save_pretrained(path)
    return path
