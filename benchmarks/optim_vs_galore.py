#!/usr/bin/env python3
"""GaLore in subspaces vs galore-torch vs AdamW: step time, basis-refresh time and optimizer-state memory.

Workload: the tiny LLaMA of ``subspaces pretrain`` (hidden 256, intermediate 688, 2 layers, byte vocabulary; or
SmolLM2-135M with ``--smollm2``), causal-LM loss on random token ids. GaLore projects the q/k/v/o/gate/up/down
weights with rank ``--rank`` (scale 0.25), every other parameter gets plain AdamW, as in the paper's LLaMA code.
Each optimizer steps its own copy of the model; the copies see the same gradients.

Measured, interleaved step by step after warm-up (medians of ``--steps``):

* ``optimizer.step()`` between refreshes (update_every = 200): ours / galore-torch (target <= 1.0), ours / AdamW;
* a full training step (forward + backward + step): the same ratios;
* the basis refresh alone (every projected matrix's basis recomputed from a real gradient): GaLore exact SVD against
  randomized SVD and against DCT (target: >= 3x faster than exact), and the whole refresh step (update_every = 1),
  galore-torch's included;
* optimizer-state bytes: measured (``ss.optim.state_bytes``) against the analytic formula, and against AdamW.

Writes ``benchmarks/results/optim_vs_galore-<device>-<dtype>[-smollm2].{json,md}``. Run from the repository root::

    python benchmarks/optim_vs_galore.py                     # tiny LLaMA, auto device, fp32
    python benchmarks/optim_vs_galore.py --smollm2 --steps 5
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    import subspaces as ss
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))
    import subspaces as ss
import subspaces.optim  # noqa: E402,F401

TARGETS = ("attn", "mlp")


def galore_weights(model):
    return [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(t in n for t in TARGETS)]


def split(model):
    proj = galore_weights(model)
    ids = {id(p) for p in proj}
    return proj, [p for p in model.parameters() if id(p) not in ids]


def build(kind: str, model, rank: int, every: int, lr: float):
    proj, rest = split(model)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if kind == "galore-torch":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW([{"params": rest}, {"params": proj, "rank": rank, "update_proj_gap": every,
                                                "scale": 0.25, "proj_type": "std"}],
                           lr=lr, weight_decay=0.0, no_deprecation_warning=True)
    name, _, svd = kind.partition(":")
    hp = {"svd": svd} if svd else {}
    return ss.optim.setup_(model, name, lr=lr, rank=rank, update_every=every, scale=0.25,
                           targets=TARGETS, **hp)


def galore_torch_state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.ndim:
                total += v.numel() * v.element_size()
        proj = st.get("projector")
        if proj is not None and proj.ortho_matrix is not None:
            mats = proj.ortho_matrix if isinstance(proj.ortho_matrix, list) else [proj.ortho_matrix]
            total += sum(m.numel() * m.element_size() for m in mats)
    return total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def race(kinds, base, batch, args, device, *, every: int, full: bool) -> dict[str, float]:
    """Median seconds per step of each optimizer kind, interleaved; ``full`` times forward+backward+step."""
    models = {k: copy.deepcopy(base) for k in kinds}
    opts = {k: build(k, models[k], args.rank, every, args.lr) for k in kinds}
    times = {k: [] for k in kinds}
    for step in range(args.warmup + args.steps):
        if not full:  # one backward, the same gradient copied into every model
            ref = models[kinds[0]]
            ref.zero_grad()
            ref(input_ids=batch, labels=batch).loss.backward()
            for k in kinds[1:]:
                for p, q in zip(ref.parameters(), models[k].parameters()):
                    q.grad = p.grad.clone()
        shift = step % len(kinds)  # rotate the order so no optimizer always runs right after another
        for k in kinds[shift:] + kinds[:shift]:
            m, opt = models[k], opts[k]

            def go():
                if full:
                    opt.zero_grad()
                    m(input_ids=batch, labels=batch).loss.backward()
                opt.step()

            dt = timed(go, device)
            if step >= args.warmup:
                times[k].append(dt)
    state = {k: (ss.optim.state_bytes(o) if k != "galore-torch" else galore_torch_state_bytes(o)) for k, o in opts.items()}
    formula = {k: ss.optim.expected_state_bytes(o) for k, o in opts.items() if k != "galore-torch"}
    return {k: statistics.median(v) for k, v in times.items()}, state, formula


def refresh_times(base, batch, args, device) -> dict[str, float]:
    """Seconds to recompute every projected matrix's basis once (the refresh alone), median over repeats."""
    model = copy.deepcopy(base)
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    grads = [p.grad for p in galore_weights(model)]
    projectors = {
        "exact SVD": ss.optim.GaLore(rank=args.rank),
        "randomized SVD": ss.optim.GaLore(rank=args.rank, svd="randomized"),
        "DCT": ss.optim.DCT(rank=args.rank),
    }
    out = {}
    for name, proj in projectors.items():
        states = [proj.init_state(g, i) for i, g in enumerate(grads)]
        ts = []
        for rep in range(args.warmup + args.steps):
            def go():
                for st, g in zip(states, grads):
                    proj.refresh(st, g)

            dt = timed(go, device)
            if rep >= args.warmup:
                ts.append(dt)
        out[name] = statistics.median(ts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M instead of the tiny LLaMA")
    ap.add_argument("--rank", type=int, default=None, help="default: 64 (tiny LLaMA), 128 (SmolLM2)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    if args.smollm2:
        base, _ = ss.models.load_smollm2(dtype=dtype)
        args.rank = args.rank or 128
        vocab = base.config.vocab_size
    else:
        base = ss.models.tiny_llama().to(dtype)
        args.rank = args.rank or 64
        vocab = 256
    base = base.to(device).train()
    batch = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    steady = ["adamw", "galore-torch", "galore"]
    opt_t, state, formula = race(steady, base, batch, args, device, every=200, full=False)
    full_t, _, _ = race(steady, base, batch, args, device, every=200, full=True)
    refresh = ["galore-torch", "galore", "galore:randomized", "dct"]
    ref_t, ref_state, ref_formula = race(refresh, base, batch, args, device, every=1, full=False)
    basis_t = refresh_times(base, batch, args, device)

    label = f"{args.device}-{args.dtype}" + ("-smollm2" if args.smollm2 else "")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result = {
        "model": "SmolLM2-135M" if args.smollm2 else "tiny LLaMA (hidden 256, 2 layers)",
        "device": card, "dtype": args.dtype, "rank": args.rank, "batch": [args.batch, args.seq],
        "optimizer_step_s": opt_t, "train_step_s": full_t, "refresh_step_s": ref_t, "basis_refresh_s": basis_t,
        "state_bytes": {**state, **{f"{k} (refresh run)": v for k, v in ref_state.items() if k == "dct"}},
        "state_bytes_formula": {**formula, "dct": ref_formula["dct"]},
        "ratios": {
            "optimizer step, ours / galore-torch": opt_t["galore"] / opt_t["galore-torch"],
            "optimizer step, ours / AdamW": opt_t["galore"] / opt_t["adamw"],
            "train step, ours / galore-torch": full_t["galore"] / full_t["galore-torch"],
            "train step, ours / AdamW": full_t["galore"] / full_t["adamw"],
            "basis refresh alone, exact / randomized SVD": basis_t["exact SVD"] / basis_t["randomized SVD"],
            "basis refresh alone, exact / DCT": basis_t["exact SVD"] / basis_t["DCT"],
            "refresh step, exact / randomized SVD": ref_t["galore"] / ref_t["galore:randomized"],
            "refresh step, exact / DCT": ref_t["galore"] / ref_t["dct"],
            "refresh, ours exact / galore-torch": ref_t["galore"] / ref_t["galore-torch"],
            "state bytes, ours / AdamW": state["galore"] / state["adamw"],
            "state bytes, ours / galore-torch": state["galore"] / state["galore-torch"],
        },
        "state_equals_formula": {k: state[k] == formula[k] for k in formula} | {"dct": ref_state["dct"] == ref_formula["dct"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# GaLore: subspaces vs galore-torch vs AdamW — {result['model']}, {card}, {args.dtype}", "",
             f"rank {args.rank}, batch {args.batch}x{args.seq}, medians of {args.steps} interleaved steps", "",
             "| measure | value |", "|---|---|"]
    for k, v in result["ratios"].items():
        lines.append(f"| {k} | {v:.3f} |")
    for k, v in opt_t.items():
        lines.append(f"| optimizer step {k} (ms) | {1e3 * v:.1f} |")
    for k, v in full_t.items():
        lines.append(f"| train step {k} (ms) | {1e3 * v:.1f} |")
    for k, v in ref_t.items():
        lines.append(f"| refresh step {k} (ms) | {1e3 * v:.1f} |")
    for k, v in basis_t.items():
        lines.append(f"| basis refresh alone, {k} (ms) | {1e3 * v:.1f} |")
    for k, v in state.items():
        lines.append(f"| state {k} (MiB) | {v / 2**20:.3f} |")
    lines.append(f"| state = formula | {result['state_equals_formula']} |")
    for suffix, text in (("json", json.dumps(result, indent=2)), ("md", "\n".join(lines) + "\n")):
        path = args.out / f"optim_vs_galore-{label}.{suffix}"
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
