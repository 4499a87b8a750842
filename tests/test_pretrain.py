"""``subspaces pretrain``: the tiny LLaMA pretrained on the byte corpus with a chosen optimizer, its loss curve,
the comparison mode and the command line. Tiny settings (hidden 32, batch 2 x 16 bytes), seconds each."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from subspaces import SubspacesError
from subspaces.harness import pretrain as pt

TINY = dict(batch_size=2, seq_len=16, eval_every=3, eval_batches=2, progress=False,
            model_kwargs=dict(hidden_size=32, intermediate_size=64))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CLI_TINY = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
            "--hidden-size", "32", "--device", "cpu"]


def test_run_writes_curve_json_png_and_table(tmp_path):
    out = tmp_path / "run"
    r = pt.pretrain("adamw", steps=6, out=out, **TINY)
    assert sorted(p.name for p in out.iterdir()) == sorted(pt.FILES)
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "adamw" and saved["steps_done"] == 6
    assert [c["step"] for c in saved["curve"]] == [0, 3, 6]
    assert saved["curve"][0]["train_loss"] is None  # the initial evaluation has no training loss yet
    assert math.isfinite(r["final_val_loss"]) and r["final_val_ppl"] == pytest.approx(math.exp(r["final_val_loss"]))
    assert r["curve"][0]["val_loss"] == pytest.approx(math.log(256), abs=0.3)  # random init: ~uniform over bytes
    assert r["tokens_seen"] == 6 * 2 * 16 and r["ms_per_step"] > 0
    # AdamW keeps two moments per parameter: exactly the reference, ratio 1
    assert r["state_bytes"] == r["adamw_state_bytes"] == 2 * 4 * r["params"] and r["state_vs_adamw"] == 1.0
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| adamw |" in md and "val ppl" in md
    assert not [p for p in tmp_path.rglob(".*")]  # no temp leftovers


@pytest.mark.parametrize("method, hp", [("adamw", None), ("galore", {"update_every": 10})])
def test_training_loss_falls(method, hp):
    r = pt.pretrain(method, steps=30, hyperparameters=hp, **{**TINY, "eval_every": 10})
    train = [c["train_loss"] for c in r["curve"][1:]]
    assert train[-1] < train[0] - 0.2, train
    assert r["final_val_loss"] < r["curve"][0]["val_loss"] - 0.3
    if method == "galore":  # the default rank is a quarter of the hidden size, and the moments are projected
        assert r["hyperparameters"]["rank"] == 8 and r["lr"] == pt.defaults("galore")["lr"] == 1e-2
        assert r["state_vs_adamw"] < 0.8


@pytest.mark.parametrize("method", ["adamw", "galore"])
def test_bf16_parameters_train_on_cpu(method):
    r = pt.pretrain(method, steps=6, dtype="bfloat16", device="cpu", hyperparameters=None if method == "adamw"
                    else {"rank": 4}, **TINY)
    assert r["dtype"] == "bfloat16" and math.isfinite(r["final_val_loss"])
    assert r["final_val_loss"] < r["curve"][0]["val_loss"]
    assert r["state_bytes"] < (2 * 4 * r["params"] if method == "adamw" else r["adamw_state_bytes"])


def test_same_seed_same_run_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = pt.pretrain("adamw", steps=4, **TINY)
    after = torch.rand(1)
    b = pt.pretrain("adamw", steps=4, **TINY)
    c = pt.pretrain("adamw", steps=4, seed=1, **TINY)
    assert a["train_losses"] == b["train_losses"] != c["train_losses"]
    assert torch.equal(before, after)


def test_schedule_warmup_then_cosine_to_a_tenth():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = pt.schedule(opt, 100, 0.1)
    f = []
    for _ in range(100):
        f.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert f[:3] == pytest.approx([0.0, 0.1, 0.2]) and f[10] == pytest.approx(1.0)
    assert f[99] == pytest.approx(0.1, abs=1e-3) and all(f[s] >= f[s + 1] for s in range(10, 99))


def test_defaults_live_with_the_methods():
    from subspaces._registry import TRAIN

    assert pt.defaults("galore") == {"lr": 1e-2, "scale": 0.25, "update_every": 200}
    assert pt.defaults("galore") == {"lr": pt.OTHER_LR, **TRAIN.get("galore").defaults["pretrain"]}
    assert pt.defaults("adamw") == {"lr": pt.BASELINE_LR} and pt.defaults("welore")["lr"] == pt.OTHER_LR


def test_validation_is_a_fixed_held_out_tail():
    tokens = pt.corpus_tokens()
    assert tokens.dtype == torch.int64 and 0 <= int(tokens.min()) and int(tokens.max()) < 256
    train, val = pt.split(tokens, 128)
    assert len(val) == int(len(tokens) * pt.VAL_FRACTION) and len(train) + len(val) == len(tokens)
    assert torch.equal(val, tokens[-len(val):])


def test_compare_two_methods_writes_rows(tmp_path):
    out = tmp_path / "cmp"
    seen = []
    table = pt.compare_pretraining(("adamw", "galore"), steps=4, out=out, on_result=seen.append,
                       hyperparameters={"galore": {"rank": 4}}, **TINY)
    assert [r["method"] for r in table] == [r["method"] for r in seen] == ["adamw", "galore"]
    for row in table:
        assert set(row) >= {"method", "val_loss", "val_ppl", "state_mb", "state_vs_adamw", "ms_per_step", "params"}
        assert math.isfinite(row["val_loss"])
    assert table[0]["state_vs_adamw"] == 1.0 and table[1]["state_vs_adamw"] < 1.0
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["adamw", "galore"] and saved["runs"][1]["hyperparameters"]["rank"] == 4
    assert saved["rows"] == json.loads(json.dumps(table))
    assert (out / "loss_curve.png").stat().st_size > 0 and "| galore |" in (out / "results.md").read_text()


def _no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started before the input was validated")

    monkeypatch.setattr(pt, "_train", boom)


@pytest.mark.parametrize("call, message", [
    (lambda: pt.pretrain("nope", steps=2, **TINY), "unknown pretraining method 'nope'"),
    (lambda: pt.compare_pretraining(("adamw", "galore", "galorre"), steps=2, **TINY), "Did you mean 'galore'"),
    (lambda: pt.pretrain("galore", steps=2, hyperparameters={"rnak": 4}, **TINY), "unknown hyperparameter"),
    (lambda: pt.pretrain("adamw", steps=2, hyperparameters={"rank": 4}, **TINY), "unknown hyperparameter"),
    (lambda: pt.pretrain("adamw", steps=0, **TINY), "steps=0"),
    (lambda: pt.pretrain("adamw", steps=2, lr=-1.0, **TINY), "lr=-1.0"),
    (lambda: pt.pretrain("adamw", steps=2, warmup=1.5, **TINY), "warmup=1.5"),
    (lambda: pt.pretrain("adamw", steps=2, hyperparameters={"lr": "fast"}, **TINY), "lr='fast'"),
    (lambda: pt.compare_pretraining(("adamw",), steps=2, hyperparameters={"adamw": {"eps": -1.0}}, **TINY), "epsilon"),
    (lambda: pt.pretrain("adamw", steps=2, dtype="int8", **TINY), "dtype='int8'"),
    (lambda: pt.compare_pretraining(("adamw", "adamw"), steps=2, **TINY), "repeated"),
    (lambda: pt.compare_pretraining(("adamw",), steps=2, hyperparameters={"galore": {}}, **TINY), "not among"),
])
def test_bad_input_fails_before_training(monkeypatch, call, message):
    _no_training(monkeypatch)
    with pytest.raises(SubspacesError, match=message.replace("(", r"\(").replace("[", r"\[")):
        call()


def test_unknown_method_lists_the_available_ones(monkeypatch):
    _no_training(monkeypatch)
    with pytest.raises(SubspacesError) as e:
        pt.compare_pretraining(("adamw", "not_a_method"), steps=2, **TINY)
    for name in pt.available_methods():
        assert name in str(e.value)
    assert "adamw" in str(e.value) and "galore" in str(e.value)


def test_output_folder_with_other_files_is_refused_before_training(monkeypatch, tmp_path):
    _no_training(monkeypatch)
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(SubspacesError, match="not an empty folder"):
        pt.pretrain("adamw", steps=2, out=tmp_path, **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_divergence_is_reported_not_raised(tmp_path):
    r = pt.pretrain("adamw", steps=6, lr=1e20, grad_clip=None, out=tmp_path / "run", **TINY)
    assert r["diverged"] and r["steps_done"] <= 6 and not math.isfinite(r["final_val_loss"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())  # strict JSON: NaN is written as null
    assert saved["diverged"] and saved["final_val_loss"] is None and "(diverged)" in (tmp_path / "run" / "results.md").read_text()


def test_every_registered_method_pretrains_with_its_defaults():
    for method in pt.available_methods():
        r = pt.pretrain(method, steps=3, **TINY)
        assert r["steps_done"] == 3 and math.isfinite(r["final_val_loss"]), method
        assert r["state_bytes"] > 0 and r["params"] > 0


# ------------------------------------------------------------------------------------------------ command line
def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "subspaces.cli", "pretrain", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=300)


def test_cli_single_run(tmp_path):
    out = tmp_path / "run"
    r = cli("--method", "galore", "-p", "rank=4", "-p", "update_every=2", *CLI_TINY, "--out", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(pt.FILES)
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "galore" and saved["hyperparameters"]["rank"] == 4 and saved["model"]["hidden_size"] == 32
    assert "galore" in r.stdout and "val loss" in r.stdout


def test_cli_compare(tmp_path):
    out = tmp_path / "cmp"
    r = cli("--compare-methods", "adamw,galore", *CLI_TINY, "--out", out)
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in saved["rows"]] == ["adamw", "galore"]
    assert "state / AdamW" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--method", "galorre"], "Did you mean 'galore'"),
    (["--compare-methods", "adamw,nope"], "unknown pretraining method 'nope'"),
    (["--method", "galore", "-p", "rank"], "expected key=value"),
    (["--method", "galore", "-p", "rank=0"], "rank=0"),
    (["--method", "galore", "--compare"], "--compare-methods"),
    (["--compare", "-p", "rank=4"], "cannot be combined"),
    (["--steps", "0"], "steps=0"),
    (["--lr", "-1"], "lr=-1"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    r = cli(*CLI_TINY, *args, "--out", tmp_path / "out")  # args last: they win over CLI_TINY
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_help_names_the_options():
    r = cli("--help")
    assert r.returncode == 0
    for option in ("--method", "--steps", "--batch-size", "--seq-len", "--lr", "--param", "--compare",
                   "--compare-methods", "--out", "--seed", "--device"):
        assert option in r.stdout
