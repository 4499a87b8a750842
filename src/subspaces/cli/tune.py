"""``subspaces tune``: fine-tune one method, evaluate, save the adapter and metrics.json."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from ._common import is_main_process, output_dir, results_table

Opt = typer.Option


def parse_targets(text: str | None):
    """"all-linear"; "re:<regex>" (full match on module names); else comma-separated name suffixes."""
    if text is None:
        return None
    if text == "all-linear":
        return text
    if text.startswith("re:"):
        return text[3:]
    return [t.strip() for t in text.split(",") if t.strip()]


def hyperparameters(params: list[str], rank, alpha, targets) -> dict:
    from ..harness.compare import parse_params

    hp = parse_params(",".join(params), "--param")
    for key, value in (("rank", rank), ("alpha", alpha), ("targets", parse_targets(targets))):
        if value is not None:
            hp[key] = value
    return hp


@app.command("tune")
def tune(
    method: Annotated[str, Opt("--method", "-m", help="'probe', 'full' or an adapter (see `subspaces methods`)")] = "lora",
    model: Annotated[str, Opt(help="'minilm' (embedded default) or a Hugging Face model folder")] = "minilm",
    task: Annotated[str, Opt(help="docstring, concurrency, net, formats, devtools, chatterbot-topics, "
                                  "chatterbot-languages")] = "docstring",
    rank: Annotated[Optional[int], Opt(help="adapter rank")] = None,
    alpha: Annotated[Optional[float], Opt(help="adapter alpha (LoRA scaling alpha/rank)")] = None,
    targets: Annotated[Optional[str], Opt(help="modules to adapt: 'query,value' (name suffixes), 'all-linear', "
                                               "or 're:<regex>'; default W_q and W_v")] = None,
    param: Annotated[list[str], Opt("--param", "-p", help="any other hyperparameter, key=value (repeatable)")] = [],
    epochs: Annotated[float, Opt(help="training epochs")] = 3,
    lr: Annotated[Optional[float], Opt(help="learning rate (default: probe 3e-2, full 1e-4, adapters 1e-3; the head at least 5e-3)")] = None,
    batch_size: Annotated[int, Opt(help="global batch size (split across torchrun processes)")] = 32,
    max_length: Annotated[int, Opt(help="max tokens per text")] = 64,
    max_train: Annotated[Optional[int], Opt(help="use only the first N training examples")] = None,
    max_test: Annotated[Optional[int], Opt(help="use only the first N test examples")] = None,
    seed: Annotated[int, Opt(help="seed of the split, the initialization and the data order")] = 0,
    bf16: Annotated[bool, Opt(help="bf16 autocast")] = False,
    adapter: Annotated[Optional[Path], Opt(help="start from this saved adapter (native or PEFT folder)")] = None,
    out: Annotated[Optional[Path], Opt(help="output folder (new or empty); default runs/tune-<method>-<time>")] = None,
) -> None:
    """Fine-tune one method on a text-classification task; save the adapter (native and, when LoRA-shaped,
    PEFT format) and metrics.json. Works under `torchrun --nproc_per_node N`."""
    from rich.console import Console

    from .. import save_adapter
    from .._errors import SubspacesError
    from .._io import atomic_dir, write_json, write_safetensors
    from ..harness import finetune
    from ..harness.compare import check_method

    check_method(method)
    hp = hyperparameters(param, rank, alpha, targets)
    out = output_dir(out, f"tune-{method}")
    metrics, clf = finetune(model=model, task=task, method=method, hyperparameters=hp, epochs=epochs, seed=seed,
                            lr=lr, batch_size=batch_size, max_length=max_length, max_train=max_train,
                            max_test=max_test, bf16=bf16, adapter=adapter, progress=is_main_process())
    if not is_main_process():
        return
    with atomic_dir(out) as tmp:
        if method in ("probe", "full"):
            trained = {k: p for k, p in clf.named_parameters() if p.requires_grad}
            write_safetensors(tmp / "weights.safetensors", trained)
        else:
            save_adapter(clf, tmp / "adapter")
            try:
                save_adapter(clf, tmp / "adapter-peft", format="peft")
            except SubspacesError:
                pass  # not LoRA-shaped: the native format holds it
        write_json(tmp / "metrics.json", metrics)
    console = Console()
    console.print(results_table([metrics], f"{method} on {task} ({model})"))
    console.print(f"saved to {out}/")
