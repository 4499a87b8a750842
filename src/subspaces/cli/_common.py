"""Helpers shared by subcommands: output folders, process rank, result tables."""
from __future__ import annotations

import os
import time
from pathlib import Path

from .._errors import SubspacesError


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def output_dir(out: Path | None, stem: str) -> Path:
    """``out`` or a fresh ``runs/<stem>-<time>``; an existing folder must be empty (we never mix with or
    overwrite a user's files)."""
    if out is None:
        out = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SubspacesError(f"output {out} already exists and is not an empty folder; choose another --out")
    return out


def results_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("method", "test acc", "trainable params", "wall time (s)", "peak mem (MB)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        acc = f"{r['test_accuracy']:.4f}"
        if len(r.get("seeds", ())) > 1:
            acc += f" ± {r['test_accuracy_std']:.4f}"
        table.add_row(r.get("label", r["method"]), acc, f"{r['trainable_params']:,}",
                      f"{r['wall_time_s']:.1f}", f"{r['peak_memory_mb']:.0f}")
    return table
