"""Parity of subspaces' merges with FusionBench's own implementations, on small random models (CPU, fp32).

Runs FusionBench's task arithmetic (``TaskArithmeticAlgorithm``; its functional ``task_arithmetic_merge`` raises
TypeError on nn.Modules in fusion-bench 0.2.33: Parameter vs Tensor in its strict state-dict check), TIES-merging
(``TiesMergingAlgorithm``), OPCM
(``OPCMForCLIP`` and the general ``OPCM``) and continual task arithmetic (``ContinualTaskArithmeticForCLIP``) and ours
(``subspaces.merge.merge`` / ``merge_stream``) on the same base + fine-tuned models, and reports max |ours − theirs|
over every tensor (target ≤ 1e-6). Fine-tuned models are the base plus random full-rank task vectors (Gaussian plus
a low-rank part, so the merged updates have a decaying spectrum).

Run in a separate venv holding fusion-bench (it pins packages the project's venv must not get):

    PYTHONPATH=src /tmp/fbvenv/bin/python benchmarks/merge_vs_fusion_bench.py

Writes benchmarks/results/merge_vs_fusion_bench.{json,md}.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time
import types
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
TOL = 1e-6


def _import_fusion_bench():
    """fusion_bench.method.opcm imports the CLIP task pool, which fails under transformers 5 (CLIPVisionTransformer
    left modeling_clip). OPCM uses the task pool only to evaluate, which is off here, so a stand-in module is
    registered when (and only when) the real one does not import."""
    try:
        import fusion_bench.taskpool.clip_vision  # noqa: F401
    except ImportError:
        stub = types.ModuleType("fusion_bench.taskpool.clip_vision")
        stub.CLIPVisionModelTaskPool = type("CLIPVisionModelTaskPool", (), {})
        sys.modules["fusion_bench.taskpool.clip_vision"] = stub
    import lightning as L
    from fusion_bench.method.opcm.opcm import OPCMForCLIP
    from fusion_bench.method.opcm.opcm_general import OPCM
    from fusion_bench.method.opcm.task_arithmetic import ContinualTaskArithmeticForCLIP
    from fusion_bench.method.task_arithmetic.task_arithmetic import TaskArithmeticAlgorithm
    from fusion_bench.method.ties_merging.ties_merging import TiesMergingAlgorithm
    from fusion_bench.modelpool import BaseModelPool

    return SimpleNamespace(L=L, OPCMForCLIP=OPCMForCLIP, OPCM=OPCM, ContinualTA=ContinualTaskArithmeticForCLIP,
                           TA=TaskArithmeticAlgorithm, Ties=TiesMergingAlgorithm,
                           BaseModelPool=BaseModelPool)


class MLP(nn.Module):
    """Linear layers of several shapes, a LayerNorm and an embedding (no buffers: FusionBench's TIES flattens every
    state-dict entry, integer buffers included)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.fc1 = nn.Linear(24, 48)
        self.norm = nn.LayerNorm(48)
        self.fc2 = nn.Linear(48, 32)
        self.head = nn.Linear(32, 10, bias=False)


def build(kind: str, n: int, seed: int = 0) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(seed)
    if kind == "mlp":
        base = MLP()
    else:
        from subspaces.models import tiny_llama

        base = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=128, tie_word_embeddings=False, seed=seed)
    base = base.float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    models = []
    for _ in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                tv = 0.01 * torch.randn(p.shape, generator=g)
                if p.dim() == 2:  # plus a rank-2 part: a spectrum with a few dominant directions
                    r = min(2, *p.shape)
                    tv += 0.05 * torch.randn(p.shape[0], r, generator=g) @ torch.randn(r, p.shape[1], generator=g) \
                        / p.shape[1] ** 0.5
                p.add_(tv)
        models.append(m)
    return base, models


def sd(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def max_diff(ours: dict, theirs: dict, base: dict) -> dict:
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    diff = max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in theirs)
    moved = max(float((theirs[k].double() - base[k].double()).abs().max()) for k in theirs)
    worst = max(theirs, key=lambda k: float((ours[k].double() - theirs[k].double()).abs().max()))
    return {"max_abs_diff": diff, "max_abs_update": moved, "worst_tensor": worst, "pass": diff <= TOL}


def fb_pool(fb, base, models):
    return fb.BaseModelPool({"_pretrained_": copy.deepcopy(base),
                             **{f"task{i}": copy.deepcopy(m) for i, m in enumerate(models)}})


def fb_stream(fb, cls, base, models, **kw):
    algo = cls(shuffle_order=kw.pop("shuffle_order", False), save_on_every_step=False, evaluate_on_every_step=False,
               **kw)
    algo.fabric = fb.L.Fabric(accelerator="cpu", devices=1)
    algo._program = SimpleNamespace(taskpool=SimpleNamespace(_test_datasets={}))  # read, unused without evaluation
    return sd(algo.run(fb_pool(fb, base, models)))


def cases(fb, kind: str, n: int) -> list[dict]:
    import subspaces.merge as sm

    base, models = build(kind, n)
    b, ms = sd(base), [sd(m) for m in models]
    rows = []

    def row(method, setting, ours, theirs, seconds):
        rows.append({"model": kind, "T": n, "method": method, "setting": setting, **max_diff(ours, theirs, b),
                     "seconds_ours": round(seconds, 3)})

    theirs = sd(fb.TA(scaling_factor=0.3).run(fb_pool(fb, base, models)))
    t0 = time.perf_counter()
    ours = sm.merge("task_arithmetic", base=b, models=ms, scaling=0.3)
    row("task_arithmetic", "λ=0.3", ours, theirs, time.perf_counter() - t0)

    for merge_func, normalize in (("sum", False), ("mean", True)):
        algo = fb.Ties(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func=merge_func)
        theirs = sd(algo.run(fb_pool(fb, base, models)))
        t0 = time.perf_counter()
        ours = sm.merge("ties", base=b, models=ms, scaling=0.3, density=0.2, trim="model", normalize=normalize)
        row("ties", f"λ=0.3, k=20%, merge_func={merge_func}, trim=model", ours, theirs, time.perf_counter() - t0)

    for cls_name in ("OPCMForCLIP", "OPCM"):
        for alpha in (0.5, 0.8):
            theirs = fb_stream(fb, getattr(fb, cls_name), base, models, alpha=alpha)
            t0 = time.perf_counter()
            ours = sm.merge("opcm", base=base, models=ms, alpha=alpha)  # the module: exact nn.Linear selection
            row("opcm", f"fusion-bench {cls_name}, α={alpha}", ours, theirs, time.perf_counter() - t0)
            # the same in float64: separates the algorithm from fp32 rounding (see the notes)
            base64, models64 = copy.deepcopy(base).double(), [copy.deepcopy(m).double() for m in models]
            theirs64 = fb_stream(fb, getattr(fb, cls_name), base64, models64, alpha=alpha)
            rows[-1]["fusion_bench_fp32_vs_fp64"] = max_diff(theirs, theirs64, b)["max_abs_diff"]
            t0 = time.perf_counter()
            ours64 = sm.merge("opcm", base=base64, models=[sd(m) for m in models64], alpha=alpha)
            row("opcm", f"fusion-bench {cls_name}, α={alpha}, float64", ours64, theirs64, time.perf_counter() - t0)
    theirs = fb_stream(fb, fb.OPCMForCLIP, base, models, alpha=0.5, shuffle_order=True, seed=3)
    t0 = time.perf_counter()
    ours = sm.merge("opcm", base=b, models=ms, alpha=0.5, shuffle_order=True, seed=3)  # state dict: name heuristic
    row("opcm", "OPCMForCLIP, α=0.5, shuffle_order seed=3, base as state dict", ours, theirs, time.perf_counter() - t0)

    theirs = fb_stream(fb, fb.ContinualTA, base, models, scaling_factor=0.3)
    t0 = time.perf_counter()
    ours = sm.merge("continual_ta", base=b, models=ms, scaling=0.3)
    row("continual_ta", "ContinualTaskArithmeticForCLIP, λ=0.3", ours, theirs, time.perf_counter() - t0)
    return rows


NOTES = [
    "- TIES (`trim=\"model\"`): like the official code and FusionBench's `topk_values_mask`, the threshold is "
    "`kthvalue(n − ⌊k·n⌋)` of the whole flattened task vector, which keeps ⌊k·n⌋ + 1 entries (mergekit's per-tensor "
    "rule, our default `trim=\"tensor\"`, keeps ⌊k·n⌋).",
    "- OPCM in fp32: the algorithm is the same (the float64 rows agree to ~1e-15). Zeroing u_iᵀ τ v_i on every "
    "singular pair of the merged update is ill-conditioned where its singular values are close (the bulk of a random "
    "task vector), so fp32 rounding moves the result by ~1e-6: FusionBench's own fp32 result is up to 3.6e-6 away "
    "from its float64 result (column *FusionBench fp32 vs fp64*), more than ours is from it. Ours uses a thin SVD "
    "(FusionBench: full m×m, n×n factors); a full-SVD variant of ours lands 5.7e-7 from FusionBench's fp32 result "
    "but no closer to the float64 one (3.4e-6), so the thin form is kept.",
    "- `fusion_bench.method.opcm` imports the CLIP task pool, which fails under transformers 5; the script registers "
    "a stand-in for that module (used only for evaluation, off here) when the real one fails.",
]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# subspaces merges vs FusionBench (CPU, fp32)", "",
        f"fusion-bench {meta['fusion_bench']}, torch {meta['torch']}, transformers {meta['transformers']}. "
        f"max |ours − FusionBench| over all tensors; target ≤ {TOL:g}. Max |update| = max |θ_merged − θ₀| "
        "(FusionBench's), for scale. Generated by `benchmarks/merge_vs_fusion_bench.py`.", "",
        "| model | T | method | setting | max abs diff | max abs update | FusionBench fp32 vs fp64 | worst tensor "
        "| pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp64_gap = f"{r['fusion_bench_fp32_vs_fp64']:.2e}" if "fusion_bench_fp32_vs_fp64" in r else ""
        ok = "yes" if r["pass"] else "NO"
        lines.append(f"| {r['model']} | {r['T']} | {r['method']} | {r['setting']} | {r['max_abs_diff']:.2e} | "
                     f"{r['max_abs_update']:.2e} | {fp64_gap} | `{r['worst_tensor']}` | {ok} |")
    lines += ["", "Notes:", "", *NOTES]
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    fb = _import_fusion_bench()
    rows = []
    for kind, n in (("mlp", 1), ("mlp", 5), ("tiny_llama", 4)):
        rows += cases(fb, kind, n)
    meta = {"fusion_bench": version("fusion-bench"), "torch": torch.__version__,
            "transformers": version("transformers"), "device": "cpu", "dtype": "float32", "tolerance": TOL}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "merge_vs_fusion_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = markdown(rows, meta)
    (RESULTS / "merge_vs_fusion_bench.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
