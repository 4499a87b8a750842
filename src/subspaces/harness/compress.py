"""Compress a causal LM (default: the embedded SmolLM2-135M) on held-out Python documentation text.

Data: ``pydoc_corpus()`` tokenized with the model's tokenizer; the last ``EVAL_FRACTION`` of the text is held out.
Calibration draws ``calib_samples`` random windows of ``seq_len`` tokens from the first part (seeded); perplexity is
measured on evenly spaced, non-overlapping windows of the held-out tail (the same ones for every run).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from .._device import parse_dtype
from .._errors import SubspacesError
from ..models import load_causal_lm

EVAL_FRACTION = 0.1
FILES = ("model", "report.json", "report.md")


def corpus_split(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (int64) of the calibration part and of the held-out tail of the pydoc corpus."""
    from ..data import pydoc_corpus

    text = pydoc_corpus()
    cut = int(len(text) * (1 - EVAL_FRACTION))
    from ..models import _quiet

    with _quiet():  # no "longer than the maximum length" warning: the text is cut into windows afterwards
        ids = [torch.tensor(tokenizer(part)["input_ids"], dtype=torch.long) for part in (text[:cut], text[cut:])]
    return ids[0], ids[1]


def calibration_batches(ids: torch.Tensor, n: int, seq_len: int, *, seed: int = 0, batch_size: int = 8
                        ) -> list[torch.Tensor]:
    """``n`` random windows of ``seq_len`` tokens, in batches of ``batch_size`` (unpadded)."""
    if n < 1 or seq_len < 2 or len(ids) <= seq_len:
        raise SubspacesError(f"calibration: need n >= 1 windows of 2 <= seq_len < {len(ids)} tokens "
                             f"(got n={n}, seq_len={seq_len})")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=g)
    windows = ids[starts[:, None] + torch.arange(seq_len)]
    return list(windows.split(batch_size))


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Evenly spaced non-overlapping windows (k, seq_len + 1) of the held-out ids."""
    total = (len(ids) - 1) // seq_len
    if total < 1:
        raise SubspacesError(f"seq_len={seq_len}: longer than the held-out text ({len(ids)} tokens)")
    k = min(total, max_windows)
    starts = torch.linspace(0, (total - 1) * seq_len, k).long() // seq_len * seq_len
    return ids[starts[:, None] + torch.arange(seq_len + 1)]


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token cross-entropy over every predicted token of ``windows``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for w in windows.split(batch_size):
        w = w.to(device)
        logits = model(input_ids=w[:, :-1]).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    return math.exp(total / count)


def compress_lm(
    method: str,
    *,
    model: str = "smollm2",
    ratio: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    allocation: str = "uniform",
    hyperparameters: dict[str, Any] | None = None,
    calib_samples: int = 32,
    seq_len: int = 256,
    eval_samples: int = 32,
    baseline: bool = True,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    out: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compress ``model`` with ``method``; perplexity before (``baseline``) and after; writes ``out`` if given:
    the compressed model folder (``out/model``, reloads with ``ss.compress.load_compressed``), ``report.json`` and
    ``report.md``. Returns the result (summary and per-layer report)."""
    from ..compress import compress_, config_for

    config = config_for(method, hyperparameters or {})  # bad hyperparameters fail before the model loads
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SubspacesError(f"output {out} already exists and is not an empty folder; choose another")
    torch_dtype = parse_dtype(dtype, allowed=("float32", "bfloat16"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lm, tokenizer = load_causal_lm(model, torch_dtype, dev)
    calib_ids, eval_ids = corpus_split(tokenizer)
    batches = calibration_batches(calib_ids, calib_samples, seq_len, seed=seed)
    windows = eval_windows(eval_ids, seq_len, eval_samples)
    ppl_before = perplexity(lm, windows) if baseline else None
    start = time.perf_counter()
    report = compress_(lm, config, ratio=ratio, rank=rank, energy=energy, allocation=allocation,
                       calibration=batches, progress=progress)
    seconds = time.perf_counter() - start
    result = {
        "model": model, "method": method, "hyperparameters": hyperparameters or {}, "allocation": allocation,
        "target_ratio": ratio, "ratio": report.get("ratio"), "params_before": report.get("params_before"),
        "params_after": report.get("params_after"), "ppl_before": ppl_before, "ppl_after": perplexity(lm, windows),
        "compress_seconds": seconds, "calib_samples": calib_samples, "seq_len": seq_len,
        "eval_tokens": int(windows[:, 1:].numel()), "device": str(dev), "dtype": dtype, "seed": seed,
        "report": report,
    }
    if out is not None:
        write(out, lm, tokenizer, result)
    return result


def markdown(result: dict[str, Any]) -> str:
    r = result
    lines = [f"# {r['method']} on {r['model']}", "",
             f"- parameters of the targeted layers: {r['params_before']:,} → {r['params_after']:,} "
             f"({100 * r['ratio']:.1f}% removed; target {r['target_ratio']})",
             f"- perplexity on held-out pydoc text ({r['eval_tokens']:,} tokens): "
             + (f"{r['ppl_before']:.3f} → " if r["ppl_before"] is not None else "") + f"{r['ppl_after']:.3f}",
             f"- compression time: {r['compress_seconds']:.1f} s ({r['calib_samples']} calibration windows of "
             f"{r['seq_len']} tokens, {r['device']}, {r['dtype']})", "",
             "| layer | shape | rank | params before | params after | weight error | output error |",
             "|---|---|---|---|---|---|---|"]
    for row in r["report"].get("layers", []):
        oe = row.get("output_error")
        lines.append(f"| {row['name']} | {'×'.join(map(str, row['shape']))} | {row['rank']} | {row['params_before']:,} "
                     f"| {row['params_after']:,} | {row['weight_error']:.4f} | {'' if oe is None else f'{oe:.4f}'} |")
    return "\n".join(lines) + "\n"


def write(out: Path, model: torch.nn.Module, tokenizer: Any, result: dict[str, Any]) -> None:
    """The model folder, report.json and report.md, each written atomically into ``out``."""
    from .._io import atomic_path, write_json
    from ..compress import save_compressed

    out.mkdir(parents=True, exist_ok=True)
    save_compressed(model, out / "model", tokenizer=tokenizer, report=result["report"])
    write_json(out / "report.json", result)
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text(markdown(result))
