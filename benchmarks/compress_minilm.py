"""MiniLM fine-tuned on the docstring → package task (full fine-tuning, the harness recipe), then compressed by
svd / fwsvd / asvd / svd_llm at several parameter reductions of its encoder Linears: test accuracy against the ratio.

    python benchmarks/compress_minilm.py --methods svd,fwsvd,asvd,svd_llm --ratios 0.1,0.2,0.3,0.4,0.5

Calibration: the first ``--calib`` training batches (labels included, for FWSVD's Fisher). The batches are padded
per batch (shortest-first order keeps padding small); padded positions count in the statistics.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import subspaces as ss
from subspaces.harness._classifier import Collator, encode
from subspaces.harness.finetune import finetune


@torch.no_grad()
def accuracy(clf, rows, collate, batch_size: int = 64) -> float:
    clf.eval()
    hits = 0
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i:i + batch_size])
        logits = clf(input_ids=b["input_ids"], attention_mask=b["attention_mask"])["logits"]
        hits += int((logits.argmax(-1) == b["labels"]).sum())
    return hits / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="svd,fwsvd,asvd,svd_llm")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--calib", type=int, default=8, help="training batches of 32 for calibration")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/compress_minilm.json"))
    p.add_argument("--md", type=Path, default=Path("benchmarks/results/compress_minilm.md"))
    args = p.parse_args()

    from subspaces.data import load_task

    metrics, clf = finetune(model="minilm", task="docstring", method="full", epochs=args.epochs, seed=0,
                            progress=False)
    clf = clf.cpu().float().eval()
    _, tok = ss.models.load_minilm()
    data = load_task("docstring", seed=0)
    collate = Collator(tok.pad_token_id)
    train = sorted(encode(tok, data.train_texts, data.train_labels, 64), key=lambda r: len(r["input_ids"]))
    test = encode(tok, data.test_texts, data.test_labels, 64)
    step = max(1, len(train) // (args.calib * 32))
    pool = train[::step][: args.calib * 32]  # spread over lengths, then batched shortest-first
    batches = [collate(pool[i:i + 32]) for i in range(0, len(pool), 32)]
    base_acc = accuracy(clf, test, collate)
    print(f"fine-tuned accuracy {base_acc:.4f} (harness: {metrics['test_accuracy']:.4f})", flush=True)
    rows = []
    for method in args.methods.split(","):
        for ratio in (float(q) for q in args.ratios.split(",")):
            model = copy.deepcopy(clf)
            rep = ss.compress_(model, method, ratio=ratio, calibration=batches, exclude=["pooler.dense"],
                               loss_fn=lambda m, b: m(**b)["loss"])
            rows.append({"method": method, "target_ratio": ratio, "ratio": rep["ratio"],
                         "accuracy": accuracy(model, test, collate)})
            print(json.dumps(rows[-1]), flush=True)
    ratios = sorted({r["target_ratio"] for r in rows})
    md = [f"Test accuracy (fine-tuned, uncompressed: {base_acc:.4f}; {len(test)} test examples):", "",
          "| method | " + " | ".join(f"{int(100 * q)}%" for q in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    for method in dict.fromkeys(r["method"] for r in rows):
        md.append(f"| {method} | " + " | ".join(f"{r['accuracy']:.4f}" for q in ratios for r in rows
                                                  if r["method"] == method and r["target_ratio"] == q) + " |")
    from subspaces._io import atomic_path, write_json

    write_json(args.json, {"uncompressed_accuracy": base_acc, "finetune": {k: v for k, v in metrics.items()
                                                                           if k != "loss_history"}, "rows": rows})
    with atomic_path(args.md) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
