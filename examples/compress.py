"""Compress: SmolLM2-135M factorized by SVD-LLM at 20% fewer parameters, saved and reloaded; int4 weights
compensated by EoRA. Calibration and perplexity on Python's documentation text."""
import copy
import tempfile

import torch

import subspaces as ss

model, tok = ss.models.load_smollm2()                      # converted once from the packaged GGUF
original = copy.deepcopy(model)
ids = tok(ss.data.pydoc_corpus()[:60_000], return_tensors="pt").input_ids
batches = [ids[:, i:i + 256] for i in range(0, 8 * 256, 256)]               # calibration: 8 × 256 tokens
held_out = [ids[:, i:i + 256] for i in range(8 * 256, 12 * 256, 256)]


@torch.no_grad()
def perplexity(m) -> float:
    return torch.stack([m(input_ids=x, labels=x).loss for x in held_out]).mean().exp().item()


report = ss.compress_(model, "svd_llm", ratio=0.2, calibration=batches)   # or rank=64, energy=0.9;
print(f"svd_llm removed {report['ratio']:.1%} of the Linear weights")    # allocation="uniform" | "energy" | "welore"
tmp = tempfile.TemporaryDirectory()                        # removed when the script ends
ss.compress.save_compressed(model, f"{tmp.name}/small", tokenizer=tok, report=report)   # a Hugging Face folder
reloaded = ss.compress.load_compressed(f"{tmp.name}/small")
with torch.no_grad():
    assert torch.equal(reloaded(input_ids=held_out[0]).logits, model(input_ids=held_out[0]).logits)

quantized = copy.deepcopy(original)                        # another compression of the same model: int4 weights
ss.compress.quantize_rtn_(quantized, bits=4)
rtn = perplexity(quantized)
ss.compress.eora_(quantized, original, batches, rank=16)   # training-free compensation of the error
print(f"perplexity: original {perplexity(original):.1f}, svd_llm 20% {perplexity(model):.1f}, "
      f"int4 {rtn:.1f}, int4 + EoRA rank 16 {perplexity(quantized):.1f}")
