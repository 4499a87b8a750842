#!/usr/bin/env python3
"""Sculpting Subspaces vs sequential full fine-tuning: three MiniLM text-classification tasks learned in sequence.

Sculpting Subspaces (https://arxiv.org/abs/2504.07097, ``ss.optim.Sculpt``) fine-tunes every weight but projects
each Linear weight's gradient (and, with ``project_update``, Adam's update) away from the top singular subspace
of the weight as it was when the task began, with a per-layer retention from ``layer_retention``. This script
measures how much it reduces forgetting against plain sequential fine-tuning (SeqFT) on the embedded data.

Protocol (task-incremental: the task id is known at test time):

* tasks ``--tasks`` (default concurrency, chatterbot-topics, net from ``subspaces.data``; split seed = run seed),
  optionally subsampled to ``--max-train`` / ``--max-test`` examples (first examples of the shuffled splits);
* one all-MiniLM-L6-v2 encoder shared by all tasks, masked mean pooling, one fresh linear head per task
  (``harness._classifier.MeanPoolClassifier`` sharing the encoder); a head trains only on its own task and is
  frozen afterwards;
* each task: ``--epochs`` epochs, batch ``--batch-size``, max length ``--max-length``; encoder AdamW at ``--lr``
  (weight decay 0), head AdamW at ``--head-lr`` (the harness's rate for fresh heads); linear warmup over 6% of the
  task's steps then linear decay to 0, restarted per task; optimizer state fresh per task for both methods;
* SeqFT: plain AdamW on every encoder parameter;
* Sculpt: ``Sculpt(retention={name: r}).setup(encoder)`` on the Linear weights of the 6 blocks (embeddings,
  LayerNorms and biases plain), ``projection="block"``, ``project_update=True``; before task t the retention comes
  from ``layer_retention(encoder, ...)`` (mrr ``--mrr``, trr ``--trr``) on ``--importance-samples`` training
  examples of task t−1 (for the first task: of the task itself, i.e. the pretrained model is "task 0"), and
  ``next_task_`` recomputes the protected bases from the current weights;
* after each task every task seen so far is evaluated with its own head: accuracy matrix A[t][j];
  average accuracy AA = mean_j A[T−1][j]; backward transfer BWT = mean_{j<T−1} (A[T−1][j] − A[j][j]).

CPU threads default to 1 (``--threads``). Outputs (atomically): ``<out>.json`` and ``<out>.md``. Run from the
repository root::

    python benchmarks/sculpt_continual.py --seeds 0 1 2                          # full run (GPU recommended)
    python benchmarks/sculpt_continual.py --max-train 64 --max-test 64 --epochs 1 --out /tmp/sculpt_smoke  # smoke
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    import subspaces as ss
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "src"))
    import subspaces as ss
from subspaces._io import atomic_path, write_json  # noqa: E402
from subspaces.data import load_task  # noqa: E402
from subspaces.harness._classifier import Collator, MeanPoolClassifier, encode  # noqa: E402
from subspaces.harness.finetune import HEAD_LR, WARMUP  # noqa: E402
from subspaces.models import load_minilm  # noqa: E402
from subspaces.optim import Sculpt, layer_retention, next_task_  # noqa: E402

METHODS = {"seqft": "sequential full fine-tuning (AdamW)", "sculpt": "Sculpting Subspaces (Projected AdamW)"}


def batches(rows: list[dict], collate: Collator, size: int, device: torch.device, order=None) -> list[dict]:
    idx = list(range(len(rows))) if order is None else order
    return [{k: v.to(device) for k, v in collate([rows[i] for i in idx[s:s + size]]).items()}
            for s in range(0, len(idx), size)]


@torch.no_grad()
def accuracy(clf: MeanPoolClassifier, data: list[dict]) -> float:
    clf.eval()
    right = total = 0
    for b in data:
        pred = clf(b["input_ids"], b["attention_mask"])["logits"].argmax(-1)
        right += int((pred == b["labels"]).sum())
        total += len(b["labels"])
    return right / total


def schedule(total: int):
    warm = max(1, math.ceil(WARMUP * total))
    return lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))


def prepare(seed: int, args, device: torch.device) -> dict:
    """The pretrained encoder and the tokenized tasks of one seed (shared by the methods)."""
    encoder, tokenizer = load_minilm()
    collate = Collator(tokenizer.pad_token_id)
    tasks = [load_task(name, seed=seed) for name in args.tasks]
    train = [encode(tokenizer, t.train_texts[:args.max_train], t.train_labels[:args.max_train], args.max_length)
             for t in tasks]
    test = [batches(encode(tokenizer, t.test_texts[:args.max_test], t.test_labels[:args.max_test],
                           args.max_length), collate, 64, device) for t in tasks]
    return dict(encoder=encoder.to(device), collate=collate, labels=[t.num_labels for t in tasks], train=train,
                test=test)


def run(method: str, seed: int, args, data: dict) -> dict:
    device, collate, train, test = data["encoder"].device, data["collate"], data["train"], data["test"]
    encoder = copy.deepcopy(data["encoder"])
    torch.manual_seed(seed)  # the heads' init
    clfs = [MeanPoolClassifier(encoder, n).to(device) for n in data["labels"]]  # the encoder is shared
    acc: list[list[float]] = []
    opt, retentions, start = None, [], time.perf_counter()
    for t, clf in enumerate(clfs):
        if method == "sculpt":
            source = train[t - 1] if t > 0 else train[t]
            probe = [{k: b[k] for k in ("input_ids", "attention_mask")}
                     for b in batches(source[:args.importance_samples], collate, args.batch_size, device)]
            r = layer_retention(encoder, probe, mrr=args.mrr, trr=args.trr)
            retentions.append({k.split(".attention.")[0]: round(v, 4) for k, v in r.items()
                               if ".attention.self.query." in k})  # one ratio per block
            if opt is None:
                opt = Sculpt(retention=r).setup(encoder, lr=args.lr, weight_decay=0.0)
            else:
                next_task_(opt, r)  # bases from the current weights, fresh Adam state
        else:
            opt = torch.optim.AdamW(encoder.parameters(), lr=args.lr, weight_decay=0.0)
        head_opt = torch.optim.AdamW(clf.classifier.parameters(), lr=args.head_lr, weight_decay=0.0)
        steps = args.epochs * math.ceil(len(train[t]) / args.batch_size)
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule(steps)) for o in (opt, head_opt)]
        g = torch.Generator().manual_seed(seed * 1000 + t)
        clf.train()
        for _ in range(args.epochs):
            order = torch.randperm(len(train[t]), generator=g).tolist()
            for b in batches(train[t], collate, args.batch_size, device, order):
                loss = F.cross_entropy(clf(b["input_ids"], b["attention_mask"])["logits"].float(), b["labels"])
                loss.backward()
                for o in (opt, head_opt):
                    o.step()
                    o.zero_grad(set_to_none=True)
                for s in scheds:
                    s.step()
        clf.classifier.requires_grad_(False)  # frozen: later tasks never touch this head
        acc.append([accuracy(clfs[j], test[j]) for j in range(t + 1)])
        print(f"  {method} seed {seed} after {args.tasks[t]}: " + " ".join(f"{a:.3f}" for a in acc[-1]), flush=True)
    T = len(clfs)
    return dict(method=method, seed=seed, acc=acc, aa=statistics.fmean(acc[-1]),
                bwt=statistics.fmean(acc[-1][j] - acc[j][j] for j in range(T - 1)) if T > 1 else 0.0,
                just_learned=statistics.fmean(acc[j][j] for j in range(T)), wall_s=time.perf_counter() - start,
                train_examples=[len(x) for x in train], test_examples=[sum(len(b["labels"]) for b in x) for x in test],
                retention_by_block=retentions)


def summarize(runs: list[dict], tasks: list[str]) -> dict:
    out = {}
    for m in METHODS:
        rows = [r for r in runs if r["method"] == m]
        if not rows:
            continue
        T = len(tasks)
        mean_acc = [[statistics.fmean(r["acc"][t][j] for r in rows) for j in range(t + 1)] for t in range(T)]
        sd = lambda k: statistics.stdev([r[k] for r in rows]) if len(rows) > 1 else 0.0  # noqa: E731
        out[m] = dict(aa=statistics.fmean(r["aa"] for r in rows), aa_std=sd("aa"),
                      bwt=statistics.fmean(r["bwt"] for r in rows), bwt_std=sd("bwt"),
                      just_learned=statistics.fmean(r["just_learned"] for r in rows), mean_acc=mean_acc,
                      wall_s=statistics.fmean(r["wall_s"] for r in rows))
    return out


def markdown(result: dict) -> str:
    c, tasks = result["config"], result["config"]["tasks"]
    lines = [f"# Sculpting Subspaces vs SeqFT: continual MiniLM classification ({result['started']})", "",
             f"Tasks in order: {', '.join(tasks)}; seeds {c['seeds']}; {c['epochs']} epoch(s)/task, lr {c['lr']} "
             f"(heads {c['head_lr']}), batch {c['batch_size']}, max train {c['max_train']}, max test "
             f"{c['max_test']}; mrr {c['mrr']}, trr {c['trr']}; device {result['device']}.", "",
             "| method | AA | BWT | acc. just after learning (mean) | wall s |", "|---|---|---|---|---|"]
    for m, s in result["summary"].items():
        lines.append(f"| {METHODS[m]} | {s['aa']:.3f} ± {s['aa_std']:.3f} | {s['bwt']:+.3f} ± {s['bwt_std']:.3f} "
                     f"| {s['just_learned']:.3f} | {s['wall_s']:.0f} |")
    for m, s in result["summary"].items():
        lines += ["", f"Accuracy matrix, {METHODS[m]} (row: after training task; column: evaluated task; "
                  "mean over seeds)", "", "| after \\ on | " + " | ".join(tasks) + " |",
                  "|---" * (len(tasks) + 1) + "|"]
        for t, row in enumerate(s["mean_acc"]):
            lines.append(f"| {tasks[t]} | " + " | ".join([f"{a:.3f}" for a in row] + [""] * (len(tasks) - t - 1))
                         + " |")
    lines += ["", "AA: mean final accuracy over tasks. BWT: mean over earlier tasks of (final − just after "
              "learning); negative = forgetting.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["concurrency", "chatterbot-topics", "net"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=HEAD_LR)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--importance-samples", type=int, default=64)
    p.add_argument("--mrr", type=float, default=0.1)
    p.add_argument("--trr", type=float, default=0.8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads; 1 avoids OpenMP spin-waits (SVD 70x slower seen with 2 threads on a busy box)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sculpt_continual"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    started, t0 = _dt.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    runs = []
    for seed in args.seeds:
        data = prepare(seed, args, device)
        runs += [run(m, seed, args, data) for m in args.methods]
    config = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    result = dict(experiment="sculpt_continual", started=started,
                  command="python benchmarks/sculpt_continual.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  machine=f"{platform.processor() or platform.machine()}, {platform.system()}", torch=torch.__version__,
                  device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
                  config=config, summary=summarize(runs, args.tasks), runs=runs, total_s=time.perf_counter() - t0)
    md = markdown(result)
    write_json(f"{args.out}.json", result)
    with atomic_path(f"{args.out}.md") as tmp:
        tmp.write_text(md, encoding="utf-8")
    print(md)
    return result


if __name__ == "__main__":
    main()
