"""Model merging on MiniLM: four text tasks, one fully fine-tuned MiniLM each, merged by every registered method.

    python benchmarks/merge_minilm.py                       # fine-tune (cached), then every registered merge method
    python benchmarks/merge_minilm.py --finetune-only       # only the four fine-tuned models (cached)
    python benchmarks/merge_minilm.py --methods ties,opcm   # a subset

Tasks (``subspaces.data.load_task``, seed 0): three stdlib package groups and chatterbot topics. Each task's train
split loses a stratified ``--val-fraction`` as validation (for λ selection); the test split is the task's own.

Fine-tuning (LP-FT, Kumar et al. 2022, arXiv 2202.10054): the task head is first fit on frozen mean-pooled features
(the "frozen probe" row), then backbone and head are trained together with AdamW (linear schedule, 6% warmup, batch
32, max_length 64). Starting from the probe head keeps the features a head expects close to the pretrained ones, so
a merged backbone is read by each task's own head meaningfully. Heads are task-specific and never merged (as the
task-arithmetic paper keeps CLIP's heads); only the backbone (``BertModel``) state dicts are merged. Each fine-tuned
backbone + head is cached as safetensors under ``subspaces._io.cache_dir("merge-minilm")``.

Merging: tensor methods run through ``subspaces.merge.merge(name, base=θ₀, models=[θ₁..θ₄], **hp)``; their
scaling λ is chosen on the validation splits (average accuracy) from a small grid, as the TA/TIES/DARE papers do.
Learned methods get the encoder module at θ0, each task's logits (its own head on the mean-pooled states) and data
through ``LEARNED`` below: AdaMerging and Concrete the unlabelled test inputs of every task (test-time adaptation,
as their papers), aTLAS ``--shots`` labelled train examples per class and the validation split; their step counts
are cut to ``--learned-steps`` for a CPU budget (``0``: the methods' defaults, 500 / 2000 steps). Stream methods
run through ``merge_stream`` in three task orders: average test accuracy over the tasks seen so far after each
step; their row in the main table is the final merge of the first order. A method that is not registered, or whose
inputs this script cannot supply, is skipped with a line saying why.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

TASKS = "concurrency,devtools,formats,chatterbot-topics"
# The order the table lists methods in; registered methods not named here come after them.
ORDER = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "model_stock",
         "adamerging", "concrete", "atlas", "opcm", "continual_ta")
# Validation grids for the scaling λ (TA paper: {0, 0.05, ..., 1}; TIES paper: λ in [0.8, 1.8] around 1).
GRIDS = {
    "task_arithmetic": [round(0.1 * i, 1) for i in range(1, 11)],
    "dare_linear": [round(0.1 * i, 1) for i in range(1, 11)],
    "breadcrumbs": [round(0.1 * i, 1) for i in range(1, 11)],
    "ties": [0.3, 0.5, 0.7, 0.9, 1.0, 1.2, 1.5, 1.8],
    "dare_ties": [0.3, 0.5, 0.7, 0.9, 1.0, 1.2, 1.5, 1.8],
}
SCALING_NAMES = ("scaling", "lam", "lambda_", "scale")  # whichever the method's signature uses
# Fixed hyperparameters (paper defaults), given only where the method's signature has the name.
FIXED = {"ties": {"density": 0.2, "trim": "model"}, "dare_linear": {"seed": 0}, "dare_ties": {"seed": 0}}
RECIPE = "lpft-v1"  # bump when the fine-tuning recipe changes: the cache key includes it


# --------------------------------------------------------------------------- data

def split_validation(texts: list[str], labels: list[int], fraction: float, seed: int):
    """Stratified: per label round(n * fraction) examples (at least one when n >= 2) go to validation."""
    rng = random.Random(seed)
    by: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by.setdefault(y, []).append(i)
    val: list[int] = []
    for y in sorted(by):
        idx = by[y]
        rng.shuffle(idx)
        k = min(max(round(len(idx) * fraction), 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val += idx[:k]
    vset = set(val)
    train = [i for i in range(len(labels)) if i not in vset]
    pick = lambda ids: ([texts[i] for i in ids], [labels[i] for i in ids])  # noqa: E731
    return pick(train), pick(sorted(val))


def load_tasks(names: list[str], tok, args) -> dict[str, dict]:
    from subspaces.data import load_task
    from subspaces.harness._classifier import encode

    out = {}
    for name in names:
        d = load_task(name, seed=args.seed)
        (trx, try_), (vx, vy) = split_validation(d.train_texts, d.train_labels, args.val_fraction, args.seed)
        out[name] = {"num_labels": d.num_labels, "labels": d.label_names,
                     "train": encode(tok, trx, try_, args.max_length), "val": encode(tok, vx, vy, args.max_length),
                     "test": encode(tok, d.test_texts, d.test_labels, args.max_length)}
        print(f"task {name}: {d.num_labels} labels, train {len(trx)} / val {len(vx)} / test {len(d.test_texts)}",
              flush=True)
    return out


def batches_by_length(rows: list[dict], collate, batch_size: int, rng: random.Random | None = None):
    """Batches of similar lengths (little padding); shuffled batch order when ``rng`` is given."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    if rng is not None:  # sort within random megabatches, so batches differ between epochs
        rng.shuffle(order)
        mega = batch_size * 8
        order = [i for k in range(0, len(order), mega)
                 for i in sorted(order[k:k + mega], key=lambda i: len(rows[i]["input_ids"]))]
    chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(chunks)
    return [(c, collate([rows[i] for i in c])) for c in chunks]


@torch.no_grad()
def pooled(encoder, rows: list[dict], collate, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states (MeanPoolClassifier.pool), in the order of ``rows``."""
    encoder.eval()
    out = torch.empty(len(rows), encoder.config.hidden_size)
    for idx, b in batches_by_length(rows, collate, batch_size):
        h = encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out[idx] = ((h * m).sum(1) / m.sum(1).clamp_min(1)).float()
    return out


def labels_of(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([r["labels"] for r in rows])


# --------------------------------------------------------------------------- fine-tuning (cached)

def fit_probe(feats: torch.Tensor, y: torch.Tensor, num_labels: int, seed: int, steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression on frozen features (full batch Adam, small L2)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(feats.shape[1], num_labels)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(feats), y) + 1e-4 * head.weight.square().sum()
        loss.backward()
        opt.step()
    return head


def accuracy_of(head: torch.nn.Module, feats: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(feats).argmax(-1) == y).float().mean())


def finetune_task(name: str, task: dict, args, collate) -> dict[str, Any]:
    """LP-FT on one task; returns {"state": backbone state dict, "head": {weight, bias}, "meta": {...}}."""
    import subspaces as ss
    from subspaces._io import atomic_folder, cache_dir, read_json, read_safetensors, write_json, write_safetensors

    key = {"task": name, "epochs": args.epochs, "lr": args.lr, "seed": args.seed, "max_length": args.max_length,
           "val_fraction": args.val_fraction, "batch_size": args.batch_size, "recipe": RECIPE}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir("merge-minilm", f"{name}-{digest}")

    def build(tmp: Path) -> None:
        encoder, _ = ss.models.load_minilm()
        ytr, yva, yte = (labels_of(task[s]) for s in ("train", "val", "test"))
        ftr, fva, fte = (pooled(encoder, task[s], collate) for s in ("train", "val", "test"))
        head = fit_probe(ftr, ytr, task["num_labels"], args.seed)
        probe = {"val": accuracy_of(head, fva, yva), "test": accuracy_of(head, fte, yte)}
        print(f"  [{name}] frozen probe: val {probe['val']:.4f}  test {probe['test']:.4f}", flush=True)
        torch.manual_seed(args.seed)
        rng = random.Random(args.seed)
        params = list(encoder.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        per_epoch = math.ceil(len(task["train"]) / args.batch_size)
        total = per_epoch * args.epochs
        warm = max(1, round(0.06 * total))
        sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay to 0
            opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / (total - warm))))
        start, step, history = time.perf_counter(), 0, []
        for epoch in range(args.epochs):
            encoder.train()
            for _, b in batches_by_length(task["train"], collate, args.batch_size, rng):
                h = encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                loss = torch.nn.functional.cross_entropy(head((h * m).sum(1) / m.sum(1).clamp_min(1)), b["labels"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                history.append(round(loss.item(), 4))
            val = accuracy_of(head, pooled(encoder, task["val"], collate), yva)
            print(f"  [{name}] epoch {epoch + 1}/{args.epochs}: step {step}/{total}, loss {history[-1]:.3f}, "
                  f"val {val:.4f}, {time.perf_counter() - start:.0f}s", flush=True)
        wall = time.perf_counter() - start
        meta = dict(key, probe=probe, val_accuracy=val,
                    test_accuracy=accuracy_of(head, pooled(encoder, task["test"], collate), yte),
                    wall_time_s=round(wall, 1), steps=total, threads=torch.get_num_threads(), loss_history=history)
        tensors = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
        tensors.update({f"classifier.{k}": v for k, v in head.state_dict().items()})
        write_safetensors(tmp / "model.safetensors", tensors)
        write_json(tmp / "meta.json", meta)

    cached = folder.is_dir()
    if not cached:
        print(f"fine-tuning {name} (cache: {folder})", flush=True)
    atomic_folder(folder, build)
    meta = read_json(folder / "meta.json")
    t = read_safetensors(folder / "model.safetensors")
    print(f"{name}: fine-tuned test {meta['test_accuracy']:.4f} (probe {meta['probe']['test']:.4f}, "
          f"{meta['wall_time_s']:.0f}s{', cached' if cached else ''})", flush=True)
    return {"state": {k[8:]: v for k, v in t.items() if k.startswith("encoder.")},
            "head": {k[11:]: v for k, v in t.items() if k.startswith("classifier.")}, "meta": meta}


# --------------------------------------------------------------------------- evaluation

class Evaluator:
    """Accuracy of a backbone state dict on each task with that task's own (fine-tuned) head."""

    def __init__(self, encoder, tasks: dict, heads: dict, collate) -> None:
        self.encoder, self.tasks, self.collate = encoder, tasks, collate
        self.heads = {}
        for name, sd in heads.items():
            h = torch.nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
            h.load_state_dict(sd)
            self.heads[name] = h.eval().requires_grad_(False)

    def __call__(self, state: dict[str, torch.Tensor], split: str, names: list[str] | None = None) -> dict[str, float]:
        self.encoder.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
        out = {}
        for name in names or list(self.tasks):
            rows = self.tasks[name][split]
            out[name] = accuracy_of(self.heads[name], pooled(self.encoder, rows, self.collate), labels_of(rows))
        return out


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


class LearnedInputs:
    """What the learned merges take besides the models: ``base`` = the encoder module at θ0 (they run it through
    torch.func.functional_call), per task unlabelled test batches (AdaMerging, Concrete: test-time adaptation) or
    labelled k-shot train batches and the validation split (aTLAS), and per task ``logits(output, inputs)``: mean
    pooling, then that task's own head."""

    def __init__(self, module, tasks, heads, collate, args) -> None:
        self.module, self.names = module, list(tasks)
        strip = lambda b: {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}  # noqa: E731
        self.unlabeled = [[strip(b) for _, b in batches_by_length(tasks[n]["test"], collate, 16, random.Random(0))]
                          for n in tasks]
        self.val = {n: [b for _, b in batches_by_length(tasks[n]["val"], collate, 64)] for n in tasks}
        self.few_shot = {n: few_shot(tasks[n]["train"], args.shots, collate, args.seed) for n in tasks}
        self.logits = [self._logits(heads[n]) for n in tasks]
        self.logits_by_task = dict(zip(self.names, self.logits))

    @staticmethod
    def _logits(head):
        def fn(output, inputs):
            h = output.last_hidden_state
            m = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)
            return head((h * m).sum(1) / m.sum(1).clamp_min(1))
        return fn


def few_shot(rows: list[dict], k: int, collate, seed: int, batch_size: int = 32, min_batches: int = 10) -> list[dict]:
    """k labelled examples per class (all of a smaller class), repeated in fresh shuffles until an epoch has
    ``min_batches`` batches (the official aTLAS few-shot script oversamples to about 10 batches per epoch)."""
    rng, by = random.Random(seed), {}
    for r in rows:
        by.setdefault(r["labels"], []).append(r)
    pick = [r for y in sorted(by) for r in rng.sample(by[y], min(k, len(by[y])))]
    order: list[dict] = []
    while len(order) < min_batches * batch_size:
        order += rng.sample(pick, len(pick))
    return [collate(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


# How each learned method gets its inputs and its (CPU-budget) hyperparameters; ``steps`` = --learned-steps.
LEARNED: dict[str, Callable[[LearnedInputs, int], dict]] = {
    "adamerging": lambda c, steps: {"data": c.unlabeled, "logits": c.logits, **({"steps": steps} if steps else {})},
    "concrete": lambda c, steps: {"data": c.unlabeled, "logits": c.logits, **({"steps": steps} if steps else {})},
    "atlas": lambda c, steps: {"data": c.few_shot, "logits": c.logits_by_task, "val": c.val,
                               **({"epochs": max(1, steps // min(map(len, c.few_shot.values())))} if steps else {})},
}


def run_tensor(name, fn, merge, base, models, evaluate, log) -> dict:
    from subspaces.merge import schema

    sig = schema(fn)
    hp = {k: v for k, v in FIXED.get(name, {}).items() if k in sig or (k == "seed" and "generator" in sig)}
    scale = next((s for s in SCALING_NAMES if s in sig), None)
    grid = GRIDS.get(name) if scale else None
    if name in GRIDS and not scale:
        log(f"  {name}: no scaling parameter among {SCALING_NAMES} in its signature {list(sig)}; using defaults")
    chosen, val_curve = None, {}
    if grid:
        for lam in grid:
            val = mean(evaluate(merge(name, base=base, models=models, **hp, **{scale: lam}), "val"))
            val_curve[lam] = round(val, 4)
            log(f"  {name} {scale}={lam}: val avg {val:.4f}")
        chosen = max(grid, key=lambda v: (val_curve[v], -abs(v - 1)))  # ties: the value nearer 1
        hp[scale] = chosen
    merged = merge(name, base=base, models=models, **hp)
    plain = (int, float, str, bool, type(None))
    return {"hp": {**{k: v for k, v in sig.items() if isinstance(v, plain)}, **hp},
            "chosen": {scale: chosen} if chosen is not None else {}, "val_curve": val_curve,
            "val": evaluate(merged, "val"), "test": evaluate(merged, "test")}


def run_stream(name, base, models, names, orders, evaluate, log) -> dict:
    """One pass of ``merge_stream`` per order: average test accuracy over the tasks seen after every step."""
    from subspaces.merge import merge_stream

    out = []
    for order in orders:
        steps, label = [], " > ".join(names[i] for i in order)
        for st in merge_stream(name, base=base, models=[models[i] for i in order]):
            seen = [names[i] for i in order[:st.step]]
            acc = evaluate(st, "test", seen)
            info = {k: round(float(v), 4) for k, v in st.info.items() if isinstance(v, (int, float))}
            steps.append({"seen": seen, "test": acc, "avg": mean(acc), "info": info})
            log(f"  {name} [{label}] step {st.step}: avg over seen {mean(acc):.4f} {info}")
        final = evaluate(st, "test")  # the last step has seen every task
        out.append({"order": [names[i] for i in order], "steps": steps, "final_test": final})
    return {"orders": out, "final_avg_mean": sum(o["steps"][-1]["avg"] for o in out) / len(out)}


# --------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    names = res["tasks"]
    short = {n: n.replace("chatterbot-topics", "chatterbot") for n in names}
    ind = {n: res["individual"][n] for n in names}
    head = "| model | " + " | ".join(short[n] for n in names) + " | avg | normalized avg |"
    lines = [f"MiniLM-L6 ({res['config']['epochs']} epochs LP-FT, lr {res['config']['lr']}), test accuracy per task "
             "with each task's own head; normalized = accuracy / the individual fine-tuned model's, averaged.", "",
             head, "|---|" + "---:|" * (len(names) + 2)]

    def row(label: str, acc: dict) -> str:
        norm = sum(acc[n] / ind[n] for n in names) / len(names)
        return f"| {label} | " + " | ".join(f"{acc[n]:.4f}" for n in names) + f" | {mean(acc):.4f} | {norm:.3f} |"

    lines.append(row("frozen probe (pretrained backbone, probe head)", res["probe"]))
    lines.append(row("pretrained backbone + fine-tuned heads", res["pretrained"]))
    lines.append(row("individual fine-tuned (each on its own task)", ind))
    for m in res["methods"]:
        chosen = ", ".join(f"{k}={v}" for k, v in m["chosen"].items())
        label = m["method"] + (f" ({chosen}, val-selected)" if chosen else "")
        label += f" (stream, first order, after all {len(names)})" if m["kind"] == "stream" else ""
        label += f" ({m['hp']})" if m["kind"] == "learned" and m["hp"] else ""
        lines.append(row(label, m["test"]))
    if res["stream"]:
        lines += ["", "Stream merging: average test accuracy over the tasks seen so far, after each step "
                  "(three task orders).", "",
                  "| method | order | " + " | ".join(f"step {t}" for t in range(1, len(names) + 1)) + " |",
                  "|---|---|" + "---:|" * len(names)]
        for name, s in res["stream"].items():
            for o in s["orders"]:
                lines.append(f"| {name} | {' > '.join(short[n] for n in o['order'])} | "
                             + " | ".join(f"{st['avg']:.4f}" for st in o["steps"]) + " |")
            lines.append(f"| {name} | mean final | " + " | " * (len(names) - 1) + f"{s['final_avg_mean']:.4f} |")
    if res["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in res["skipped"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--methods", default="all", help="comma-separated merge methods, or 'all' registered ones")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--learned-steps", type=int, default=100,
                   help="optimizer steps of the learned merges (aTLAS: about that many); 0 = the methods' defaults")
    p.add_argument("--shots", type=int, default=16, help="labelled examples per class for aTLAS")
    p.add_argument("--finetune-only", action="store_true")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/merge_minilm.json"))
    p.add_argument("--md", type=Path, default=Path("benchmarks/results/merge_minilm.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import subspaces as ss
    from subspaces._io import atomic_path, write_json
    from subspaces.harness._classifier import Collator

    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.0f}s] {s}", flush=True)  # noqa: E731
    names = args.tasks.split(",")
    encoder, tok = ss.models.load_minilm()
    collate = Collator(tok.pad_token_id)
    tasks = load_tasks(names, tok, args)
    fts = {n: finetune_task(n, tasks[n], args, collate) for n in names}
    if args.finetune_only:
        return
    base_module = copy.deepcopy(encoder).eval()  # θ0 for the learned merges (the evaluator loads into `encoder`)
    base = {k: v.clone() for k, v in encoder.state_dict().items()}
    models = [fts[n]["state"] for n in names]
    evaluate = Evaluator(encoder, tasks, {n: fts[n]["head"] for n in names}, collate)
    res: dict[str, Any] = {
        "tasks": names, "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "finetune": {n: {k: v for k, v in fts[n]["meta"].items() if k != "loss_history"} for n in names},
        "probe": {n: fts[n]["meta"]["probe"]["test"] for n in names},
        "individual": {n: evaluate(fts[n]["state"], "test", [n])[n] for n in names},
        "pretrained": evaluate(base, "test"), "methods": [], "stream": {}, "skipped": {},
        "val": {"pretrained": evaluate(base, "val"),
                "individual": {n: evaluate(fts[n]["state"], "val", [n])[n] for n in names}}}
    log(f"individual {res['individual']}  pretrained+heads {res['pretrained']}")

    from subspaces._registry import MERGE
    from subspaces.merge import merge  # importing the package registers the methods

    registered = {e.name: e for e in MERGE}
    wanted = (list(ORDER) + sorted(set(registered) - set(ORDER)) if args.methods == "all"
              else args.methods.split(","))
    ident = list(range(len(names)))
    perm, rng = list(ident), random.Random(args.seed)
    while len(names) > 2 and perm in (ident, ident[::-1]):
        rng.shuffle(perm)
    orders = [ident, ident[::-1], perm] if len(names) > 2 else [ident, ident[::-1]][: len(names)]
    learned = None
    for name in wanted:
        if name not in registered:
            res["skipped"][name] = "not registered"
            log(f"skip {name}: not registered in subspaces.merge")
            continue
        fn = registered[name].obj
        kind = getattr(fn, "kind", "?")
        log(f"{name} (kind {kind})")
        start = time.perf_counter()
        try:
            if kind == "tensor":
                r = run_tensor(name, fn, merge, base, models, evaluate, log)
            elif kind == "learned":
                if name not in LEARNED:
                    raise LookupError("no LEARNED entry in this script says how to give it data and logits")
                learned = learned or LearnedInputs(base_module, tasks, evaluate.heads, collate, args)
                hp = LEARNED[name](learned, args.learned_steps)
                merged = merge(name, base=base_module, models=models, **hp)
                r = {"hp": {k: v for k, v in hp.items() if k not in ("data", "logits", "val")}, "chosen": {},
                     "val_curve": {}, "val": evaluate(merged, "val"), "test": evaluate(merged, "test")}
            elif kind == "stream":
                res["stream"][name] = s = run_stream(name, base, models, names, orders, evaluate, log)
                r = {"hp": {}, "chosen": {}, "val_curve": {}, "test": s["orders"][0]["final_test"]}
            else:
                raise LookupError(f"kind {kind!r} does not merge full fine-tuned backbones")
        except (ss.SubspacesError, LookupError) as e:
            res["skipped"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"skip {name}: {res['skipped'][name]}")
            continue
        r.update(method=name, kind=kind, seconds=round(time.perf_counter() - start, 1))
        res["methods"].append(r)
        log(f"{name}: test avg {mean(r['test']):.4f} {r['test']} {r['chosen'] or ''} ({r['seconds']:.0f}s)")
        write_json(args.json, res)  # partial results survive an interrupted run
    write_json(args.json, res)
    md = markdown(res)
    with atomic_path(args.md) as tmp:
        tmp.write_text(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
