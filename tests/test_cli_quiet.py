"""The command line prints only its own output: nothing at import, help on --help, one line for any bad input
(usage errors included), and no third-party chatter on normal paths, with peft, bitsandbytes, kernels and mergekit
installed (the test extra has them) and a plain user environment (no offline or warning settings)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import QUICK, tiny_model  # noqa: F401  (a fixture)

QUIET_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY",
              "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY")
USER_ENV = {k: v for k, v in os.environ.items() if k not in QUIET_VARS}
SUBSPACES = Path(sys.executable).with_name("subspaces")  # the console script, as users run it


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, env=USER_ENV, timeout=300)


def subcommands() -> list[str]:
    from subspaces.cli import app

    return [c.name for c in app.registered_commands]


def test_the_noisy_packages_are_installed():
    for name in ("peft", "bitsandbytes", "kernels", "mergekit"):
        assert importlib.util.find_spec(name) is not None, f"{name} (test extra) is needed to test quietness"


def test_import_prints_nothing():
    r = run(sys.executable, "-c", "import subspaces, subspaces.cli")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""


@pytest.mark.parametrize("command", [[], *([c] for c in subcommands())], ids=lambda c: " ".join(c) or "top")
def test_help_prints_only_help(command):
    r = run(SUBSPACES, *command, "--help")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.lstrip().startswith("Usage:")


@pytest.mark.parametrize("args, message", [
    (["tune", "--no-such-flag"], "No such option: --no-such-flag (see 'subspaces tune --help')"),
    (["tune", "--rank", "abc"], "Invalid value for '--rank'"),
    (["merge"], "Missing argument 'config'"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["tune", "--task", "nope"], "unknown task 'nope'"),
    (["compare", "--model", "/no/such/model"], "/no/such/model"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    r = run(SUBSPACES, *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""


def test_mergekit_yaml_syntax_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [unclosed\n")
    r = run(SUBSPACES, "merge", bad, tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "invalid YAML at line" in r.stderr and not (tmp_path / "out").exists()


def test_training_through_the_trainer_is_quiet(tiny_model, tmp_path):  # noqa: F811
    """The Trainer imports peft, and peft bitsandbytes, which logs about kernels at import time."""
    r = run(SUBSPACES, "tune", "--model", tiny_model, *QUICK, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "test acc" in r.stdout


def test_compare_children_stay_quiet(tiny_model, tmp_path):  # noqa: F811
    """compare runs each method in a spawned process: the quiet settings must reach it."""
    r = run(SUBSPACES, "compare", "--model", tiny_model, *QUICK, "--no-baselines",
            "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
