"""``subspaces compress``: compress a causal LM's Linears under a budget, report per layer, save the model."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from ._common import new_console, output_dir

Opt = typer.Option


def summary_table(result: dict):
    from rich.table import Table

    table = Table(title=f"{result['method']} on {result['model']}")
    for col in ("layers", "params before", "params after", "removed", "ppl before", "ppl after", "time (s)"):
        table.add_column(col, justify="right")
    layers = result["report"].get("layers", [])
    before = result["ppl_before"]
    table.add_row(str(len(layers)), f"{result['params_before']:,}", f"{result['params_after']:,}",
                  f"{100 * result['ratio']:.1f}%", "-" if before is None else f"{before:.3f}",
                  f"{result['ppl_after']:.3f}", f"{result['compress_seconds']:.1f}")
    return table


@app.command("compress")
def compress(
    method: Annotated[str, Opt("--method", "-m", help="a compress method (see `subspaces methods`): svd, fwsvd, "
                               "asvd, svd_llm, afm, eora, pela, ...")] = "svd_llm",
    model: Annotated[str, Opt(help="'smollm2' (embedded SmolLM2-135M) or a Hugging Face causal-LM folder")] = "smollm2",
    ratio: Annotated[Optional[float], Opt(help="fraction of the targeted Linears' parameters to remove "
                                               "(default 0.2 unless --rank or --energy is given)")] = None,
    rank: Annotated[Optional[int], Opt(help="one rank for every targeted Linear")] = None,
    energy: Annotated[Optional[float], Opt(help="per layer, the smallest rank keeping this fraction of Σσ²")] = None,
    allocation: Annotated[str, Opt(help="per-layer ranks under --ratio: uniform, energy or welore")] = "uniform",
    param: Annotated[list[str], Opt("--param", "-p", help="a hyperparameter of the method, key=value (repeatable), "
                                    "e.g. -p svd=randomized")] = [],
    calib_samples: Annotated[int, Opt(help="calibration windows drawn from the first 90% of the pydoc text")] = 32,
    seq_len: Annotated[int, Opt(help="tokens per calibration and evaluation window")] = 256,
    eval_samples: Annotated[int, Opt(help="held-out windows for perplexity (last 10% of the text)")] = 32,
    baseline: Annotated[bool, Opt(help="also measure the perplexity before compression")] = True,
    seed: Annotated[int, Opt(help="seed of the calibration windows")] = 0,
    device: Annotated[Optional[str], Opt(help="'cpu', 'cuda', ... (default: cuda if available)")] = None,
    dtype: Annotated[str, Opt(help="float32 or bfloat16")] = "float32",
    out: Annotated[Optional[Path], Opt(help="output folder (new or empty); default runs/compress-<method>-<time>")] = None,
) -> None:
    """Compress every Linear of a causal LM (the output head excepted) with one method under a parameter budget,
    calibrating on Python's documentation text, and measure perplexity on a held-out part of it. Writes the
    compressed model as a Hugging Face folder (out/model; reload with subspaces.compress.load_compressed, identical
    logits), the per-layer report as report.json and report.md (rank, parameters, weight and output error)."""
    from ..harness._methods import parse_params
    from ..harness.compress import compress_lm

    if ratio is None and rank is None and energy is None:
        ratio = 0.2
    hp = parse_params(",".join(param), "--param")
    folder = output_dir(out, f"compress-{method}")
    result = compress_lm(method, model=model, ratio=ratio, rank=rank, energy=energy, allocation=allocation,
                         hyperparameters=hp, calib_samples=calib_samples, seq_len=seq_len, eval_samples=eval_samples,
                         baseline=baseline, seed=seed, device=device, dtype=dtype, out=folder)
    console = new_console()
    console.print(summary_table(result))
    console.print(f"wrote {folder}/model, report.json, report.md")
