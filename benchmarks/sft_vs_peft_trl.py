#!/usr/bin/env python3
"""Supervised fine-tuning of SmolLM2-135M with LoRA r=16, alpha=32 on every Linear (``all-linear``): subspaces'
LoRA vs PEFT's, both trained by TRL's ``SFTTrainer`` with the same arguments (those of ``subspaces tune --task
causal-lm``: ``harness._run.trainer_kwargs``), data (the arithmetic task, batch 8) and seed.

Measured per implementation, each in a fresh process, the two alternating over ``--rounds`` rounds:

* step time: the median over the steps after ``--warmup`` of the wall time between the Trainer's ``on_step_begin``
  and ``on_step_end`` (forward, backward, optimizer step);
* peak memory: CUDA allocator peak, or on CPU the peak RSS over the process's RSS just before training (sampled every
  5 ms, ``harness._memory.PeakMemory``).

Ratios subspaces / PEFT (target <= 1.00 on both) are medians over rounds. Writes
``benchmarks/results/sft_vs_peft_trl-<device>-<dtype>.{json,md}``. Run from the repository root::

    python benchmarks/sft_vs_peft_trl.py                 # cpu, fp32, 12 steps x 2 rounds
    python benchmarks/sft_vs_peft_trl.py --device cuda --dtype bf16 --steps 40
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def one(impl: str, device: str, dtype: str, steps: int, warmup: int) -> dict:
    """Train ``steps`` steps with ``impl``'s LoRA in this process; step times and peak memory."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import subspaces as ss
    from subspaces.harness._memory import PeakMemory
    from subspaces.harness._run import trainer_kwargs

    datasets.disable_progress_bars()
    torch.manual_seed(0)
    model, tok = ss.models.load_smollm2(dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    if impl == "subspaces":
        ss.adapt_(model, "lora", targets="all-linear", rank=16, alpha=32)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    rows = ss.data.load_task("arithmetic").train[: 8 * steps]
    with tempfile.TemporaryDirectory() as scratch:
        kw = trainer_kwargs(scratch=scratch, batch_size=8, epochs=1, max_steps=steps, lr=1e-3, seed=0, bf16=False)
        kw["use_cpu"] = device == "cpu"
        args = SFTConfig(**kw, activation_checkpointing=False, max_length=256)
        trainer = SFTTrainer(model=model, args=args, processing_class=tok, train_dataset=datasets.Dataset.from_list(rows),
                             callbacks=[Clock()])
        with PeakMemory(torch.device(device)) as mem:
            trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"impl": impl, "step_s": statistics.median(times[warmup:]), "times": times,
            "peak_mb": mem.peak_bytes / 2**20, "trainable_params": trainable,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=("subspaces", "peft"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one(a.child, a.device, a.dtype, a.steps, a.warmup)))
        return
    runs: dict[str, list[dict]] = {"subspaces": [], "peft": []}
    for r in range(a.rounds):
        for impl in (("subspaces", "peft") if r % 2 == 0 else ("peft", "subspaces")):
            out = subprocess.run([sys.executable, __file__, "--child", impl, "--device", a.device, "--dtype", a.dtype,
                                  "--steps", str(a.steps), "--warmup", str(a.warmup)],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r} {impl}: {runs[impl][-1]['step_s'] * 1000:.0f} ms/step, "
                  f"{runs[impl][-1]['peak_mb']:.0f} MB", flush=True)
    ours, peft = runs["subspaces"], runs["peft"]
    step_ratio = statistics.median(o["step_s"] / q["step_s"] for o, q in zip(ours, peft))
    mem_ratio = statistics.median(o["peak_mb"] / q["peak_mb"] for o, q in zip(ours, peft))
    loss_gap = max(abs(x - y) for o, q in zip(ours, peft) for x, y in zip(o["losses"], q["losses"]))
    report = {"device": a.device, "dtype": a.dtype, "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds,
              "machine": _machine(a.device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "step_ratio": step_ratio, "memory_ratio": mem_ratio, "max_loss_gap": loss_gap, "runs": runs}
    stem = ROOT / "benchmarks" / "results" / f"sft_vs_peft_trl-{a.device.split(':')[0]}-{a.dtype}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = (f"# SFT of SmolLM2-135M, LoRA r=16 all-linear: subspaces vs PEFT (both in TRL's SFTTrainer)\n\n"
          f"{report['machine']}; {a.dtype}; batch 8 of the arithmetic task; {a.steps} steps ({a.warmup} warm-up) x "
          f"{a.rounds} rounds, each run in a fresh process, alternating; {report['date']}. Command: "
          f"`python benchmarks/sft_vs_peft_trl.py --device {a.device} --dtype {a.dtype} --steps {a.steps}`.\n\n"
          f"| | step (ms) | peak memory (MB) | trainable params |\n|---|---:|---:|---:|\n"
          f"| subspaces | {statistics.median(o['step_s'] for o in ours) * 1000:.0f} | "
          f"{statistics.median(o['peak_mb'] for o in ours):.0f} | {ours[0]['trainable_params']:,} |\n"
          f"| PEFT | {statistics.median(q['step_s'] for q in peft) * 1000:.0f} | "
          f"{statistics.median(q['peak_mb'] for q in peft):.0f} | {peft[0]['trainable_params']:,} |\n"
          f"| ratio (target ≤ 1.00) | {step_ratio:.3f} | {mem_ratio:.3f} | |\n\n"
          f"Largest gap between the two implementations' training losses at the same step: {loss_gap:.1e} "
          f"(different random LoRA inits: the libraries draw A differently).\n")
    stem.with_suffix(".md").write_text(md)
    print(md)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _machine(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


if __name__ == "__main__":
    main()
