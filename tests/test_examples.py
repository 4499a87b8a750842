"""The README's code is the files under examples/, and each runs as written (a fresh process, the user's view)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SLOW = {"compress.py"}  # SmolLM2-135M: about 90 s on 2 cores


def test_readme_python_blocks_are_the_example_files():
    blocks = re.findall(r"```python\n(.*?)```\n", (ROOT / "README.md").read_text(), re.S)
    files = {p.name: p.read_text() for p in EXAMPLES}
    assert sorted(blocks) == sorted(files.values()), \
        "every ```python block of README.md must be the whole text of one file in examples/, and every file shown"


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p
                                  for p in EXAMPLES], ids=lambda p: p.name)
def test_example_runs(path, tmp_path):
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()
    assert not any(tmp_path.iterdir())  # examples clean up after themselves
