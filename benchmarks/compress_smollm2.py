"""SmolLM2-135M compressed by svd / fwsvd / asvd / svd_llm at several parameter reductions, each with and without
EoRA compensation: perplexity on held-out pydoc text. And, with --timing, the time to compress every Linear with
exact against randomized SVD and the peak memory of streaming calibration against the model's own size.

    python benchmarks/compress_smollm2.py --methods svd,fwsvd,asvd,svd_llm --ratios 0.1,0.2,0.3 --eora-rank 16
    python benchmarks/compress_smollm2.py --timing

Writes JSON (one record per run) and a markdown table. The model is loaded once; every run compresses a fresh copy.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import subspaces as ss
from subspaces.harness import compress as H
from subspaces.harness._memory import PeakMemory


def ppl_table(rows: list[dict], base_ppl: float, eora_rank: int) -> str:
    ratios = sorted({r["target_ratio"] for r in rows})
    head = "| method | " + " | ".join(f"{int(100 * q)}%" for q in ratios) + " |"
    lines = [f"Perplexity (uncompressed: {base_ppl:.2f}); `+eora` adds rank-{eora_rank} compensation to every layer "
             "(its extra parameters are counted in the removed fraction shown in brackets).", "",
             head, "|---|" + "---:|" * len(ratios)]
    for method in dict.fromkeys(r["method"] for r in rows):
        for key, label in (("ppl", method), ("ppl_eora", method + " +eora")):
            cells = []
            for q in ratios:
                hit = [r for r in rows if r["method"] == method and r["target_ratio"] == q]
                if not hit or hit[0].get(key) is None:
                    cells.append("")
                    continue
                removed = hit[0]["ratio"] if key == "ppl" else hit[0]["ratio_eora"]
                cells.append(f"{hit[0][key]:.2f} ({100 * removed:.1f}%)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_ppl(args) -> None:
    torch.manual_seed(0)
    base, tok = ss.models.load_smollm2(dtype=torch.float32)
    calib_ids, eval_ids = H.corpus_split(tok)
    batches = H.calibration_batches(calib_ids, args.calib, args.seq, seed=0, batch_size=4)
    windows = H.eval_windows(eval_ids, args.seq, args.eval)
    base_ppl = H.perplexity(base, windows)
    print(f"uncompressed ppl {base_ppl:.3f} on {windows[:, 1:].numel()} tokens", flush=True)
    reference = {k: v.clone() for k, v in base.state_dict().items() if k.endswith("proj.weight")}
    rows = []
    for method in args.methods.split(","):
        for ratio in (float(q) for q in args.ratios.split(",")):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            rep = ss.compress_(model, method, ratio=ratio, calibration=batches, progress=args.progress)
            seconds = time.perf_counter() - start
            row = {"method": method, "target_ratio": ratio, "ratio": rep["ratio"], "seconds": seconds,
                   "ppl": H.perplexity(model, windows), "params_before": rep["params_before"],
                   "params_after": rep["params_after"],
                   "mean_output_error": sum(r["output_error"] for r in rep["layers"]) / len(rep["layers"])}
            if args.eora_rank:
                er = ss.compress.eora_(model, reference, batches, rank=args.eora_rank)
                row["ppl_eora"] = H.perplexity(model, windows)
                row["ratio_eora"] = 1 - (rep["params_after"] + er["params_added"]) / rep["params_before"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
    meta = {"calib_windows": args.calib, "seq_len": args.seq, "eval_tokens": int(windows[:, 1:].numel()),
            "ppl_uncompressed": base_ppl, "eora_rank": args.eora_rank, "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    write(args, {"meta": meta, "rows": rows}, ppl_table(rows, base_ppl, args.eora_rank))


def _timing_model(args):
    """SmolLM2 (real weights, CPU) or, with --config, the same architecture with random weights (times do not depend
    on the values; the GPU machine has no copy of the weights)."""
    if args.config is None:
        model, tok = ss.models.load_smollm2(dtype=torch.float32)
        calib_ids, _ = H.corpus_split(tok)
        return model, H.calibration_batches(calib_ids, args.calib, args.seq, seed=0, batch_size=4)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.config)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    ids = torch.randint(0, config.vocab_size, (args.calib, args.seq))
    return model, list(ids.split(4))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_timing(args) -> None:
    device = torch.device(args.device)
    base, batches = _timing_model(args)
    base = base.to(device)
    batches = [b.to(device) for b in batches]
    model_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    rows = []
    for svd in ("exact", "randomized", "exact", "randomized"):  # twice, alternating: the machine is noisy
        model = copy.deepcopy(base)
        _sync(device)
        start = time.perf_counter()
        n_layers = len(ss.compress_(model, "svd", ratio=0.2, svd=svd)["layers"])
        _sync(device)
        rows.append({"svd": svd, "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
        del model
    model = copy.deepcopy(base)
    with PeakMemory(device) as pm:
        ss.compress_(model, "svd_llm", ratio=0.2, calibration=batches)
    hidden_mb = args.calib * args.seq * base.config.hidden_size * 4 / 2**20
    mem = {"model_mb": model_mb, "peak_increase_mb": pm.peak_bytes / 2**20, "captured_hidden_states_mb": hidden_mb}
    print(json.dumps(mem), flush=True)
    ex = [r["seconds"] for r in rows if r["svd"] == "exact"]
    rz = [r["seconds"] for r in rows if r["svd"] == "randomized"]
    what = "SmolLM2-135M" + (" (random weights)" if args.config else "")
    md = (f"{what} on {device}, every Linear ({n_layers}) by plain SVD at ratio 0.2:\n\n"
          f"| SVD | seconds (2 runs) |\n|---|---|\n| exact | {ex[0]:.2f}, {ex[1]:.2f} |\n"
          f"| randomized | {rz[0]:.2f}, {rz[1]:.2f} |\n\nexact / randomized: "
          f"{min(ex) / min(rz):.2f}× (best of 2). svd_llm with {args.calib}×{args.seq} calibration tokens: peak "
          f"memory increase {mem['peak_increase_mb']:.0f} MB over the loaded model ({model_mb:.0f} MB fp32); the "
          f"captured block inputs are {hidden_mb:.0f} MB.\n")
    write(args, {"device": str(device), "timing": rows, "memory": mem, "threads": torch.get_num_threads()}, md)


def write(args, obj: dict, md: str) -> None:
    from subspaces._io import atomic_path, write_json

    write_json(args.json, obj)
    with atomic_path(args.md) as tmp:
        tmp.write_text(md)
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="svd,fwsvd,asvd,svd_llm")
    p.add_argument("--ratios", default="0.1,0.2,0.3")
    p.add_argument("--eora-rank", type=int, default=16, help="0: no EoRA runs")
    p.add_argument("--calib", type=int, default=16, help="calibration windows")
    p.add_argument("--seq", type=int, default=256, help="tokens per window")
    p.add_argument("--eval", type=int, default=16, help="held-out windows")
    p.add_argument("--timing", action="store_true", help="exact vs randomized SVD time and peak memory instead")
    p.add_argument("--config", type=Path, default=None, help="--timing on this config.json with random weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --timing")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/compress_smollm2.json"))
    p.add_argument("--md", type=Path, default=Path("benchmarks/results/compress_smollm2.md"))
    args = p.parse_args()
    (run_timing if args.timing else run_ppl)(args)


if __name__ == "__main__":
    main()
