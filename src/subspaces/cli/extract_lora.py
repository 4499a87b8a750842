"""``subspaces extract-lora --base BASE --finetuned FT --rank R [--whiten] OUT``: a PEFT LoRA from a fine-tuned causal
LM against its base (plain or activation-whitened truncated SVD of each ΔW)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from ._common import new_console

Opt = typer.Option


def _calibration(tokenizer, texts: list[Path], samples: int, seq_len: int, seed: int) -> list:
    import torch

    from .._errors import SubspacesError
    from ..harness.compress import calibration_batches, corpus_split

    if not texts:
        ids = corpus_split(tokenizer)[0]
    else:
        parts = []
        for path in texts:
            try:
                parts.append(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise SubspacesError(f"--calibration-texts {path}: cannot read ({e})") from None
        ids = torch.tensor(tokenizer("\n\n".join(parts))["input_ids"], dtype=torch.long)
    return calibration_batches(ids, samples, seq_len, seed=seed)


@app.command("extract-lora")
def extract_lora(
    out: Annotated[Path, typer.Argument(help="output folder for the PEFT LoRA; must not exist")],
    base: Annotated[str, Opt(help="the base model: a Hugging Face causal-LM folder or 'smollm2'")],
    finetuned: Annotated[str, Opt(help="the fine-tuned model (same architecture): a Hugging Face folder")],
    rank: Annotated[int, Opt(help="LoRA rank of every extracted layer")],
    whiten: Annotated[bool, Opt(help="whiten by the fine-tuned model's layer inputs (SVD-LLM): minimizes the "
                                     "output error on the calibration text instead of the weight error")] = False,
    calibration_texts: Annotated[list[Path], Opt(help="text file(s) to calibrate on with --whiten (repeatable; "
                                                      "default: the embedded Python documentation)")] = [],
    calib_samples: Annotated[int, Opt(help="calibration windows drawn from the text")] = 32,
    seq_len: Annotated[int, Opt(help="tokens per calibration window")] = 256,
    targets: Annotated[str, Opt(help="'all-linear' or comma-separated module-name suffixes, e.g. q_proj,v_proj")]
        = "all-linear",
    seed: Annotated[int, Opt(help="seed of the calibration windows")] = 0,
    device: Annotated[Optional[str], Opt(help="'cpu', 'cuda', ... (default: cuda if available)")] = None,
    dtype: Annotated[str, Opt(help="float32 or bfloat16 (the models' dtype; the SVDs run in float32/64)")]
        = "float32",
) -> None:
    """Extract a LoRA from FT against BASE: per targeted Linear, the best rank-R approximation of W_ft − W_base (in
    weight error, or with --whiten in output error on calibration text), written as a PEFT LoRA folder OUT
    (peft.PeftModel.from_pretrained and subspaces.load_adapter load it onto BASE) with extract_lora.json (per-layer
    relative errors and any change a LoRA cannot carry)."""
    from rich.table import Table

    from .._device import parse_dtype, resolve_device
    from .._errors import SubspacesError
    from ..models import load_causal_lm
    from ..merge._shards import check_new_output
    from ..merge.extract_lora import extract_lora as run

    check_new_output(out)
    if rank < 1:
        raise SubspacesError(f"--rank {rank}: must be a positive integer")
    if calibration_texts and not whiten:
        raise SubspacesError("--calibration-texts is used only with --whiten")
    for path in calibration_texts:
        if not path.is_file():
            raise SubspacesError(f"--calibration-texts {path}: no such file")
    torch_dtype = parse_dtype(dtype, allowed=("float32", "bfloat16"))
    dev = resolve_device(device)
    sel = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    base_model, _ = load_causal_lm(base, torch_dtype, dev)
    ft_model, tokenizer = load_causal_lm(finetuned, torch_dtype, dev)
    batches = _calibration(tokenizer, calibration_texts, calib_samples, seq_len, seed) if whiten else None
    result = run(base_model, ft_model, rank=rank, targets=sel, calibration=batches, out=out)
    rows = [r for r in result.report if not r.get("unchanged")]
    table = Table(title=f"extract-lora rank {rank}{' (whitened)' if whiten else ''}: {finetuned} − {base}")
    for col in ("layers", "unchanged", "mean weight error", "max weight error", "mean output error"):
        table.add_column(col, justify="right")
    werr = [r["weight_error"] for r in rows]
    oerr = [r["output_error"] for r in rows if "output_error" in r]
    table.add_row(str(len(rows)), str(len(result.report) - len(rows)), f"{sum(werr) / len(werr):.4f}",
                  f"{max(werr):.4f}", f"{sum(oerr) / len(oerr):.4f}" if oerr else "-")
    new_console().print(table)
    typer.echo(f"wrote {out} (adapter_model.safetensors, adapter_config.json, extract_lora.json)")
