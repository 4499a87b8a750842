#!/usr/bin/env python3
"""TIES over 3 SmolLM2-sized checkpoints: `subspaces merge` vs `mergekit-yaml`, wall time and peak RSS, same run.

The checkpoints: SmolLM2-135M-Instruct (the embedded default, 134.5M parameters, saved in ``--dtype``) and three
"fine-tuned" variants made by adding seeded Gaussian noise (0.01 × each tensor's std) — merging cost does not depend
on how the deltas were obtained. Both tools read the same mergekit YAML (ties, density 0.2, weight 1, normalize) and
write a new folder; each run is a fresh process (started by a small launcher whose `os.wait4` gives its peak RSS), the
two tools alternate for ``--repeats`` rounds, and the medians and ratios (subspaces / mergekit; targets: time ≤ 1.0,
RSS ≤ 0.5) go to benchmarks/results/merge_vs_mergekit-<dtype>.{json,md}. The merged tensors of the two are compared
too (mergekit computes in the YAML's dtype, bf16 here; subspaces in float32, rounded to bf16 at the end: differences of
one bf16 ulp are expected). A third mergekit run with float32 arithmetic separates that from the one rule that
differs: entries tied at the trim threshold are all kept by us (as in the TIES code), while mergekit keeps an arbitrary
⌊k·n⌋ of them; bf16 task vectors take few distinct values, so such ties are common there and rare in float32.

    python benchmarks/merge_vs_mergekit.py                # needs mergekit (pip install mergekit)
    python benchmarks/merge_vs_mergekit.py --dtype float32 --repeats 3
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_checkpoints(work: Path, n: int, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    """SmolLM2 (as ``dtype``) and ``n`` noisy copies, each a Hugging Face folder under ``work``."""
    from safetensors.torch import load_file, save_file

    from subspaces.models import smollm2_path

    source = smollm2_path()
    sd = {k: v.to(dtype) if v.is_floating_point() else v
          for k, v in load_file(str(source / "model.safetensors")).items()}
    tag = str(dtype).removeprefix("torch.")
    folders = [work / f"base-{tag}"] + [work / f"ft{i}-{tag}" for i in range(n)]
    for i, folder in enumerate(folders):
        if (folder / "model.safetensors").is_file():
            continue
        g = torch.Generator().manual_seed(i)
        tensors = sd if i == 0 else {
            k: (v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point() else v for k, v in sd.items()}
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            if (source / f).is_file():
                shutil.copyfile(source / f, folder / f)
    return folders[0], folders[1:]


# A child's ru_maxrss starts from its parent's RSS at fork time (and survives exec), so each tool is started by this
# small launcher process rather than by the benchmark, which holds torch and checkpoints.
_LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss)
"""


def run(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    code, wall, rss = lines[-1].split() if lines else ("-1", "0", "0")
    if proc.returncode != 0 or code != "0":
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-2000:]}")
    return {"wall_s": float(wall), "peak_rss_mb": int(rss) / 1024}


def compare(a: Path, b: Path) -> dict:
    from subspaces.merge import load_state_dict

    x, y = load_state_dict(a), load_state_dict(b)
    assert set(x) == set(y), set(x) ^ set(y)
    diffs = [(x[k].float() - y[k].float()).abs() for k in x]
    n = sum(d.numel() for d in diffs)
    differing = sum(int((d > 0).sum()) for d in diffs)
    return {"max_abs": max(float(d.max()) for d in diffs), "fraction_differing": differing / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if shutil.which("mergekit-yaml", path=str(BIN)) is None:
        sys.exit("mergekit is not installed in this environment: pip install mergekit")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    base, models = make_checkpoints(work, 3, getattr(torch, args.dtype))
    import yaml

    cfg = {"merge_method": "ties", "base_model": str(base), "dtype": args.dtype, "parameters": {"normalize": True},
           "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": args.density}} for m in models]}
    yml = work / "ties.yml"
    yml.write_text(yaml.safe_dump(cfg))
    tools = {
        "mergekit": lambda out: [str(BIN / "mergekit-yaml"), str(yml), str(out), "--no-copy-tokenizer"],
        "subspaces": lambda out: [str(BIN / "subspaces"), "merge", str(yml), str(out), "--no-progress"],
    }
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    for r in range(args.repeats):
        for tool, cmd in tools.items():
            out = work / f"out-{tool}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            runs[tool].append(run(cmd(out)))
            print(f"round {r} {tool}: {runs[tool][-1]}", flush=True)
    diff = compare(work / "out-mergekit-0", work / "out-subspaces-0")
    # mergekit computes in the YAML's dtype; with float32 arithmetic (out_dtype = the inputs') it should agree with us
    f32 = work / "ties-f32.yml"
    f32.write_text(yaml.safe_dump({**cfg, "dtype": "float32", "out_dtype": args.dtype}))
    shutil.rmtree(work / "out-mergekit-f32", ignore_errors=True)
    run([str(BIN / "mergekit-yaml"), str(f32), str(work / "out-mergekit-f32"), "--no-copy-tokenizer"])
    diff_f32 = compare(work / "out-mergekit-f32", work / "out-subspaces-0")
    med = {t: {k: statistics.median(x[k] for x in v) for k in ("wall_s", "peak_rss_mb")} for t, v in runs.items()}
    result = {
        "what": "TIES (density %.2f) over 3 SmolLM2-135M-sized checkpoints, %s" % (args.density, args.dtype),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, CPU only",
        "runs": runs, "median": med,
        "time_ratio": med["subspaces"]["wall_s"] / med["mergekit"]["wall_s"],
        "rss_ratio": med["subspaces"]["peak_rss_mb"] / med["mergekit"]["peak_rss_mb"],
        "difference": diff, "difference_to_mergekit_float32_arithmetic": diff_f32,
        "mergekit_version": importlib.metadata.version("mergekit"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"merge_vs_mergekit-{args.dtype}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# {result['what']}", "", f"{result['machine']}; mergekit {result['mergekit_version']}; "
          f"medians of {args.repeats} runs, each a fresh process.", "",
          "| tool | wall time (s) | peak RSS (MB) |", "|---|---:|---:|"]
    md += [f"| {t} | {m['wall_s']:.1f} | {m['peak_rss_mb']:.0f} |" for t, m in med.items()]
    md += ["", f"Ratios subspaces / mergekit: time {result['time_ratio']:.2f} (target ≤ 1.0), peak RSS "
           f"{result['rss_ratio']:.2f} (target ≤ 0.5).", "",
           f"Merged tensors vs mergekit's: {100 * diff['fraction_differing']:.2f}% of entries differ (max "
           f"{diff['max_abs']:.3g}): mergekit computes in the YAML's dtype ({args.dtype}), we in float32. Against "
           f"mergekit run with float32 arithmetic (`dtype: float32`, `out_dtype: {args.dtype}`): "
           f"{100 * diff_f32['fraction_differing']:.4f}% differ (max {diff_f32['max_abs']:.3g}).", ""]
    (args.out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
