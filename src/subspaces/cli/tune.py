"""``subspaces tune``: fine-tune one method, evaluate, save the adapter and metrics.json."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .._errors import SubspacesError
from . import app
from ._common import (AnswerPattern, BatchSize, CompletionColumn, Data, Epochs, LabelColumn, MaxLength, MaxNewTokens,
                      MaxSteps, MessagesColumn, Model, Packing, PromptColumn, Split, Task, TestFraction, TextColumn,
                      Validation, is_main_process, new_console, output_dir, results_table, task_and_options)

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
    from ..harness._methods import parse_params

    hp = parse_params(",".join(params), "--param")
    for key, value in (("rank", rank), ("alpha", alpha), ("targets", parse_targets(targets))):
        if value is not None:
            hp[key] = value
    return hp


@app.command("tune")
def tune(
    method: Annotated[str, Opt("--method", "-m", help="'probe' or 'zero-shot', 'full', an adapter or a train method "
                                                      "(see `subspaces methods`)")] = "lora",
    task: Task = "docstring",
    data: Data = None,
    model: Model = None,
    validation: Validation = None,
    split: Split = None,
    test_fraction: TestFraction = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    prompt_column: PromptColumn = None,
    completion_column: CompletionColumn = None,
    messages_column: MessagesColumn = None,
    answer_pattern: AnswerPattern = None,
    rank: Annotated[Optional[int], Opt(help="adapter rank")] = None,
    alpha: Annotated[Optional[float], Opt(help="adapter alpha (LoRA scaling alpha/rank)")] = None,
    targets: Annotated[Optional[str], Opt(help="modules to adapt: 'query,value' (name suffixes), 'all-linear', "
                                               "or 're:<regex>'; default W_q and W_v")] = None,
    param: Annotated[list[str], Opt("--param", "-p", help="any other hyperparameter, key=value (repeatable)")] = [],
    epochs: Epochs = None,
    max_steps: MaxSteps = None,
    lr: Annotated[Optional[float], Opt(help="learning rate (default: classification probe 3e-2, full and train "
                                            "methods 1e-4, adapters 1e-3 (the head at least 5e-3); causal LM full "
                                            "5e-5, adapters 1e-3, train methods 1e-4)")] = None,
    batch_size: BatchSize = None,
    max_length: MaxLength = None,
    max_new_tokens: MaxNewTokens = 64,
    packing: Packing = False,
    max_train: Annotated[Optional[int], Opt(help="use only the first N training examples")] = None,
    max_test: Annotated[Optional[int], Opt(help="use only the first N test examples")] = None,
    seed: Annotated[int, Opt(help="seed of the split, the initialization and the data order")] = 0,
    bf16: Annotated[bool, Opt(help="bf16 autocast")] = False,
    adapter: Annotated[Optional[Path], Opt(help="start from this saved adapter (native or PEFT folder)")] = None,
    out: Annotated[Optional[Path], Opt(help="output folder (new or empty); default runs/tune-<method>-<time>")] = None,
) -> None:
    """Fine-tune one method on a task — text classification or a causal LM on prompt/completion data — evaluate
    it and save the result: an adapter (native and, when LoRA-shaped, PEFT format) or the trained weights,
    metrics.json and, for a causal LM, generations.jsonl. Works under `torchrun --nproc_per_node N`."""
    from .. import save_adapter
    from .._io import atomic_dir, write_json, write_safetensors
    from ..harness.compare import with_defaults, write_generations
    from ..harness.finetune import finetune
    from ..harness.sft import finetune_lm
    from ..harness._methods import check_method

    spec, opts = task_and_options(locals())
    kind = check_method(method, spec.kind)
    hp = hyperparameters(param, rank, alpha, targets)
    model, opts = with_defaults(spec.kind, model, opts)
    out = output_dir(out, f"tune-{method}")
    recipe = finetune_lm if spec.kind == "causal-lm" else finetune
    metrics, trained, *tokenizer = recipe(model=model, task=spec.load(seed), method=method, hyperparameters=hp,
                                          seed=seed, lr=lr, adapter=adapter, progress=is_main_process(), **opts)
    if not is_main_process():
        return
    generations = metrics.pop("generations", None)
    with atomic_dir(out) as tmp:
        if kind == "adapter":
            save_adapter(trained, tmp / "adapter")
            try:
                save_adapter(trained, tmp / "adapter-peft", format="peft")
            except SubspacesError:
                pass  # not LoRA-shaped: the native format holds it
        elif tokenizer and method != "zero-shot" and not metrics["reparameterized"]:  # a causal LM: a model folder
            trained.save_pretrained(tmp / "model")
            tokenizer[0].save_pretrained(tmp / "model")
        elif method != "zero-shot":
            weights = {k: p.detach() for k, p in trained.named_parameters() if p.requires_grad}
            write_safetensors(tmp / "weights.safetensors", {k: v.contiguous() for k, v in weights.items()})
        write_json(tmp / "metrics.json", metrics)
        if generations is not None:
            write_generations(tmp / "generations.jsonl", generations)
    console = new_console()
    console.print(results_table([metrics], f"{method} on {spec.name} ({model})"))
    console.print(f"saved to {out}/")
