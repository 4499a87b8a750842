"""Merge the runs of several ``subspaces compare`` results.json files (e.g. one per seed, or methods run apart)
into one leaderboard: mean ± sample std of test accuracy over seeds, trainable parameters, mean wall time and peak
memory; printed as a markdown table and, with --out, saved as JSON.

    python benchmarks/summarize_runs.py runs/seed0/results.json runs/seed1/results.json --out board.json \
        --plot board.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from subspaces._io import write_json
from subspaces.harness.compare import plot, summarize


def runs_of(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data["runs"] if "runs" in data else data["leaderboard"]  # files written before --seed repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="results.json files of subspaces compare")
    ap.add_argument("--out", type=Path, help="write the merged leaderboard here (JSON)")
    ap.add_argument("--plot", type=Path, help="write accuracy against trainable parameters here (PNG)")
    ap.add_argument("--title", default="mean test accuracy over seeds", help="the plot's title")
    args = ap.parse_args()
    runs = [r for p in args.results for r in runs_of(p)]
    seen = set()
    for r in runs:
        key = (r["label"], r["seed"])
        if key in seen:
            raise SystemExit(f"{r['label']} seed {r['seed']} appears twice")
        seen.add(key)
    board = summarize(runs)
    print("| method | test accuracy (mean ± std) | seeds | trainable params | wall time (s) | peak memory (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in board:
        print(f"| {r['label']} | {r['test_accuracy']:.4f} ± {r['test_accuracy_std']:.4f} | {len(r['seeds'])} | "
              f"{r['trainable_params']:,} | {r['wall_time_s']:.0f} | {r['peak_memory_mb']:.0f} |")
    if args.out:
        write_json(args.out, {"leaderboard": board, "runs": runs})
    if args.plot:
        plot(board, args.plot, args.title)


if __name__ == "__main__":
    main()
