"""Package hygiene: a lean import, the public API names, the registry listing."""
from __future__ import annotations

import subprocess
import sys

import subspaces as ss

HEAVY = ("transformers", "peft", "matplotlib", "sklearn", "scipy", "yaml", "typer", "rich", "safetensors")


def test_import_loads_no_heavy_dependency():
    code = f"import sys, subspaces; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api():
    for name in ("adapt_", "fold_", "unadapt_", "adapters_disabled", "adapter_parameters", "save_adapter",
                 "load_adapter", "list_methods", "inspect_targets", "SubspacesError", "merge", "merge_stream",
                 "compress_"):
        assert name in ss.__all__ and callable(getattr(ss, name))
    assert callable(ss.merge.ties)  # the merge package is callable: ss.merge(...) and ss.merge.<method>
    assert ss.measure.effective_rank is not None and ss.linalg.truncated_svd is not None


def test_list_methods_rows():
    rows = ss.list_methods()
    assert {"family", "name", "paper", "status", "note"} == set(rows[0])
    assert all(r["note"] for r in rows if r["status"] != "complete")  # a partial method says what it leaves out
    lora = next(r for r in rows if r["name"] == "lora")
    assert lora["family"] == "adapt" and lora["paper"].startswith("https://arxiv.org/") and lora["status"] == "complete"
