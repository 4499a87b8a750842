"""SmolLM2-135M on held-out pydoc text: the attention-level methods and calibration row sampling.

1. MatryoshkaKV (PCA init, no training): attention-output error and perplexity against the fraction of the KV cache
   removed (uniform ranks).
2. Scatterbrain as a drop-in (no training): per-layer attention error against exact attention and perplexity.
3. Leverage-score row sampling of calibration tokens: spectral / Frobenius error of the sampled input moments
   against all rows (leverage vs uniform), and svd_llm at 20% calibrated on sampled rows against all rows.

    python benchmarks/compress_extras_smollm2.py
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

import subspaces as ss
from subspaces.compress import RowSampler, Scatterbrain, kv_rate_curve, sampling_error
from subspaces.harness import compress as H


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval", type=int, default=8)
    p.add_argument("--m", type=int, default=1024, help="sampled rows per layer")
    p.add_argument("--kv-train", type=int, default=0, help="instead: MatryoshkaKV at 50%% with this many distillation "
                   "steps against PCA only")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/compress_extras_smollm2.json"))
    p.add_argument("--md", type=Path, default=Path("benchmarks/results/compress_extras_smollm2.md"))
    args = p.parse_args()

    base, tok = ss.models.load_smollm2(dtype=torch.float32)
    calib_ids, eval_ids = H.corpus_split(tok)
    batches = H.calibration_batches(calib_ids, args.calib, args.seq, seed=0, batch_size=4)
    windows = H.eval_windows(eval_ids, args.seq, args.eval)
    evals = list(windows[:, :-1].split(4))
    out: dict = {"calib_tokens": args.calib * args.seq, "eval_tokens": int(windows[:, 1:].numel())}
    md = []
    if args.kv_train:
        return kv_training(args, base, batches, windows, out)

    kv = kv_rate_curve(copy.deepcopy(base), batches, [0.0, 0.25, 0.5, 0.625, 0.75], eval_batches=evals)
    out["matryoshka_kv"] = kv
    print(json.dumps(kv), flush=True)
    md += ["MatryoshkaKV, PCA-initialized, uniform ranks, no distillation training:", "",
           "| KV cache removed | kept | mean r_k | mean r_v | attention output error | perplexity |",
           "|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {100 * r['ratio']:.1f}% | {r['kept']:.3f} | {r['r_k']:.1f} | {r['r_v']:.1f} | {r['attention_error']:.4f} "
           f"| {r['perplexity']:.2f} |" for r in kv]
    md += [f"\n(uncompressed perplexity on these windows: {kv[0]['perplexity_base']:.2f})", ""]

    md += ["Scatterbrain as a drop-in (no training), attention output error (mean over layers) and perplexity:", "",
           "| features | hash rounds | bucket | mean layer error | perplexity (exact) | perplexity |", "|---:|---:|---:|---:|---:|---:|"]
    out["scatterbrain"] = []
    for feats, rounds, bucket in ((256, 0, 64), (256, 2, 64), (256, 4, 64)):
        model = copy.deepcopy(base)
        rep = ss.compress_(model, Scatterbrain(nb_features=feats, n_hashes=rounds, bucket_size=bucket, seed=0),
                           calibration=evals[:1])
        err = statistics.fmean(r["output_error"] for r in rep["layers"])
        row = {"nb_features": feats, "n_hashes": rounds, "bucket_size": bucket, "mean_layer_error": err,
               "perplexity": H.perplexity(model, windows), "perplexity_exact": H.perplexity(base, windows)}
        out["scatterbrain"].append(row)
        print(json.dumps(row), flush=True)
        md.append(f"| {feats} | {rounds} | {bucket} | {err:.3f} | {row['perplexity_exact']:.2f} | "
                  f"{row['perplexity']:.1f} |")
        del model

    first = {n: m for n, m in base.named_modules() if n.startswith("model.layers.0.") and isinstance(m, torch.nn.Linear)}
    errs = sampling_error(base, first, batches, args.m, kinds=("leverage", "uniform"))
    out["sampling_error_block0"] = errs
    md += ["", f"Calibration row sampling, block 0 ({args.calib * args.seq} token rows, m = {args.m}): error of the "
           "sampled input moment against all rows", "", "| layer | in | leverage: spectral | uniform: spectral | "
           "leverage: Frobenius | uniform: Frobenius |", "|---|---:|---:|---:|---:|---:|"]
    for name in first:
        lev = next(r for r in errs if r["name"] == name and r["kind"] == "leverage")
        uni = next(r for r in errs if r["name"] == name and r["kind"] == "uniform")
        md.append(f"| {name.split('.', 3)[-1]} | {first[name].in_features} | {lev['spectral_error']:.3f} | "
                  f"{uni['spectral_error']:.3f} | {lev['frobenius_error']:.4f} | {uni['frobenius_error']:.4f} |")
    ppl = {}
    for label, sampler in (("all rows", None), (f"leverage m={args.m}", RowSampler(m=args.m, kind="leverage")),
                           (f"uniform m={args.m}", RowSampler(m=args.m, kind="uniform"))):
        model = copy.deepcopy(base)
        ss.compress_(model, "svd_llm", ratio=0.2, calibration=batches, sampler=sampler)
        ppl[label] = H.perplexity(model, windows)
        print(label, ppl[label], flush=True)
        del model
    out["svd_llm_ratio0.2_ppl"] = ppl
    md += ["", "svd_llm at 20% calibrated on sampled rows: perplexity " +
           ", ".join(f"{k}: {v:.2f}" for k, v in ppl.items())]

    from subspaces._io import atomic_path, write_json

    write_json(args.json, out)
    with atomic_path(args.md) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    print("\n".join(md))


def kv_training(args, base, batches, windows, out) -> None:
    """MatryoshkaKV at half the cache, uniform ranks: PCA only vs Matryoshka distillation (the greedy search needs
    thousands of forwards: too slow for this CPU)."""
    from subspaces.compress import MatryoshkaKV
    from subspaces._io import atomic_path, write_json

    rows = []
    for steps, search in ((0, "uniform"), (args.kv_train, "uniform")):
        model = copy.deepcopy(base)
        rep = ss.compress_(model, MatryoshkaKV(train_steps=steps, search=search, per_round=0.5), ratio=0.5,
                           calibration=batches)
        rows.append({"train_steps": steps, "search": search, "perplexity": H.perplexity(model, windows),
                     "attention_error": rep.get("attention_error"), "kept": rep.get("kept")})
        print(json.dumps(rows[-1]), flush=True)
        del model
    out["matryoshka_kv_training"] = rows
    md = ["MatryoshkaKV at 50% of the KV cache removed: perplexity (uncompressed "
          f"{H.perplexity(base, windows):.2f})", "", "| distillation steps | ranks | perplexity |", "|---:|---|---:|"]
    md += [f"| {r['train_steps']} | {r['search']} | {r['perplexity']:.2f} |" for r in rows]
    write_json(args.json, out)
    with atomic_path(args.md) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
