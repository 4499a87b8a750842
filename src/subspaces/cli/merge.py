"""``subspaces merge CONFIG.yml OUT``: merge models described by a mergekit YAML into a new Hugging Face folder."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from . import app

Opt = typer.Option


@app.command("merge")
def merge(
    config: Annotated[Path, typer.Argument(help="mergekit YAML: merge_method, base_model, models (with per-model "
                                           "weight / density), parameters, dtype")],
    out: Annotated[Path, typer.Argument(help="output folder; must not exist")],
    device: Annotated[str, Opt(help="where the arithmetic runs: cpu, cuda, ...")] = "cpu",
    seed: Annotated[int, Opt(help="seed of the random drops (dare_linear, dare_ties)")] = 0,
    shard_size: Annotated[float, Opt(help="maximum shard size in GB")] = 2.0,
    progress: Annotated[bool, Opt(help="show a progress bar over tensors")] = True,
) -> None:
    """Merge fine-tuned models tensor by tensor, streaming: inputs are read lazily from safetensors and the result is
    written shard by shard into a temporary folder renamed to OUT at the end (nothing is left behind on error).
    Methods shared with mergekit, with mergekit's defaults: linear, task_arithmetic, ties, dare_linear, dare_ties,
    breadcrumbs, model_stock. OUT gets the base's config and tokenizer files, merge_config.json and the YAML."""
    from ..integrations.mergekit import read_config
    from ..merge._core import merge as run_merge
    from ..merge._shards import check_new_output

    check_new_output(out)
    kwargs = read_config(config)
    method = kwargs.pop("method")
    if method in ("dare_linear", "dare_ties"):
        kwargs["seed"] = seed
    start = time.perf_counter()
    run_merge(method, out=out, device=device, progress=progress, shard_bytes=int(shard_size * 1024**3),
              extra_files={"mergekit_config.yml": config.read_text()}, **kwargs)
    typer.echo(f"merged {len(kwargs['models'])} models with {method} in {time.perf_counter() - start:.1f} s: {out}")
