"""``subspaces pretrain``: pretrain the tiny LLaMA on the offline corpus with one train method, or compare several."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .._errors import SubspacesError
from . import app
from ._common import is_main_process, new_console, output_dir

Opt = typer.Option


def pretrain_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("method", "val loss", "val ppl", "state (MB)", "state / AdamW", "ms/step", "params"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"] + (" (diverged)" if r["diverged"] else ""), f"{r['val_loss']:.4f}",
                      f"{r['val_ppl']:.2f}", f"{r['state_mb']:.2f}", f"{r['state_vs_adamw']:.3f}",
                      f"{r['ms_per_step']:.1f}", f"{r['params']:,}")
    return table


@app.command("pretrain")
def pretrain(
    method: Annotated[Optional[str], Opt("--method", "-m", help="'adamw' (full-rank baseline) or a train method "
                                         "(see `subspaces methods`: galore, dct, sltrain, ...)")] = None,
    steps: Annotated[int, Opt(help="optimizer steps")] = 300,
    batch_size: Annotated[int, Opt(help="sequences per step")] = 16,
    seq_len: Annotated[int, Opt(help="bytes per sequence")] = 128,
    lr: Annotated[Optional[float], Opt(help="peak learning rate (default: the method's own pretraining default, "
                                            "kept with its registry entry; adamw 1e-3)")] = None,
    param: Annotated[list[str], Opt("--param", "-p", help="a hyperparameter of the method, key=value (repeatable), "
                                    "e.g. -p rank=32 -p update_every=100")] = [],
    compare: Annotated[bool, Opt("--compare", help="pretrain several methods on the same data and budget")] = False,
    compare_methods: Annotated[Optional[str], Opt(help="comma-separated methods for --compare (implies it); "
                                                       "default adamw,galore,dct,random,sltrain,sst")] = None,
    warmup: Annotated[float, Opt(help="fraction of the steps with a linear warmup (then cosine to 10%)")] = 0.1,
    weight_decay: Annotated[float, Opt(help="decoupled weight decay")] = 0.0,
    eval_every: Annotated[int, Opt(help="validation every N steps")] = 50,
    eval_batches: Annotated[int, Opt(help="validation batches (fixed windows of the held-out tail)")] = 8,
    hidden_size: Annotated[int, Opt(help="model width (ranks default to a quarter of it)")] = 256,
    layers: Annotated[int, Opt(help="transformer layers")] = 2,
    seed: Annotated[int, Opt(help="seed of the initialization and the data order")] = 0,
    device: Annotated[Optional[str], Opt(help="'cpu', 'cuda', 'cuda:1', ... (default: cuda if available)")] = None,
    dtype: Annotated[str, Opt(help="parameter dtype: float32 or bfloat16")] = "float32",
    out: Annotated[Optional[Path], Opt(help="output folder (new or empty); default runs/pretrain-<method>-<time>")] = None,
) -> None:
    """Pretrain the tiny LLaMA (byte vocabulary, hidden 256, 2 layers) from scratch on Python's documentation
    text with one optimizer, or with --compare several on the same data, seed and token budget. Prints the
    validation loss and perplexity, optimizer-state memory (also relative to AdamW), time per step and
    parameters; writes results.json, loss_curve.png and results.md."""
    from ..harness._methods import parse_params
    from ..harness.pretrain import COMPARE_METHODS, check_method, compare_pretraining, pretrain as run_one, \
        rows as result_rows

    compare = compare or compare_methods is not None
    hp = parse_params(",".join(param), "--param")
    model_kwargs = {"hidden_size": hidden_size, "num_hidden_layers": layers}
    if hidden_size != 256:  # keep the default model's MLP ratio (688 / 256)
        model_kwargs["intermediate_size"] = max(1, round(hidden_size * 688 / 256))
    kw = dict(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup, weight_decay=weight_decay,
              eval_every=eval_every, eval_batches=eval_batches, seed=seed, model_kwargs=model_kwargs, device=device,
              dtype=dtype)
    main = is_main_process()
    console = new_console()
    if compare:
        if method is not None:
            raise SubspacesError("--method names one run; with --compare list the methods in --compare-methods")
        if hp:
            raise SubspacesError("--param sets one method's hyperparameters; it cannot be combined with --compare")
        names = [m.strip() for m in (compare_methods or ",".join(COMPARE_METHODS)).split(",") if m.strip()]
        for name in names:
            check_method(name)  # before creating the output folder
        out = output_dir(out, "pretrain-compare")

        def report(row: dict) -> None:
            if main:
                console.print(f"[bold]{row['method']}[/]: val loss {row['val_loss']:.4f}")

        rows = compare_pretraining(names, out=out if main else None, progress=main, on_result=report, **kw)
        title = f"pretraining, {steps} steps of {batch_size}x{seq_len} bytes, seed {seed}"
    else:
        method = method or "adamw"
        check_method(method)
        out = output_dir(out, f"pretrain-{method}")
        result = run_one(method, hyperparameters=hp, out=out if main else None, progress=main, **kw)
        rows = result_rows([result])
        title = f"{method}: {steps} steps of {batch_size}x{seq_len} bytes, seed {seed}"
    if main:
        console.print(pretrain_table(rows, title))
        console.print(f"results.json, loss_curve.png and results.md in {out}/")
