"""A user's data files as tasks (read by Hugging Face datasets) and the embedded arithmetic task."""
from __future__ import annotations

import json

import pytest

import subspaces.data as D
from subspaces import SubspacesError

ROWS = [{"text": f"example number {i}", "label": ["cat", "dog", "bird"][i % 3]} for i in range(30)]


def write(path, rows, kind):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "parquet":
        ds.to_parquet(str(path))
    else:
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "disk"])
def test_classification_file_in_every_format(tmp_path, kind):
    path = write(tmp_path / (f"d.{kind}" if kind != "disk" else "saved"), ROWS, kind)
    task = D.load_task("classification", data=path, seed=1)
    assert task.kind == "classification" and task.label_names == ["bird", "cat", "dog"]
    assert len(task.train_texts) + len(task.test_texts) == 30 and len(task.test_texts) == 6  # 20%, stratified
    assert sorted(task.train_texts + task.test_texts) == sorted(r["text"] for r in ROWS)
    label_of = {r["text"]: r["label"] for r in ROWS}
    assert all(task.label_names[y] == label_of[t] for t, y in zip(task.train_texts, task.train_labels))


def test_integer_labels_keep_numeric_order_and_validation_file(tmp_path):
    rows = [{"sentence": f"s{i}", "y": i % 11} for i in range(44)]
    train = write(tmp_path / "train.jsonl", rows, "jsonl")
    valid = write(tmp_path / "valid.jsonl", rows[:11], "jsonl")
    task = D.load_task("classification", data=train, validation=valid, text_column="sentence", label_column="y")
    assert task.label_names == [str(i) for i in range(11)]
    assert len(task.train_texts) == 44 and task.test_texts == [f"s{i}" for i in range(11)]
    assert task.test_labels == list(range(11))


@pytest.mark.parametrize("rows, options, message", [
    (ROWS, {"text_column": "body"}, "no column 'body' (--text-column); columns found: text, label"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], {}, "has one class ('x')"),
    (ROWS, {"prompt_column": "text"}, "prompt_column: not an option of a classification file"),
])
def test_classification_errors(tmp_path, rows, options, message):
    path = write(tmp_path / "d.jsonl", rows, "jsonl")
    with pytest.raises(SubspacesError, match=message.replace("(", r"\(").replace(")", r"\)")):
        D.load_task("classification", data=path, **options)


def test_empty_missing_and_unsupported_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SubspacesError, match="empty.jsonl"):
        D.load_task("classification", data=tmp_path / "empty.jsonl")
    with pytest.raises(SubspacesError, match="no such file"):
        D.load_task("classification", data=tmp_path / "nope.csv")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(SubspacesError, match="unsupported file type '.txt'"):
        D.load_task("classification", data=tmp_path / "d.txt")
    with pytest.raises(SubspacesError, match="needs a data file"):
        D.load_task("causal-lm")


def test_causal_lm_prompt_completion_and_messages(tmp_path):
    rows = [{"q": f"What is {i} + 1?", "a": f" {i + 1}"} for i in range(20)]
    path = write(tmp_path / "qa.jsonl", rows, "jsonl")
    task = D.load_task("causal-lm", data=path, prompt_column="q", completion_column="a", test_fraction=0.25)
    assert task.kind == "causal-lm" and not task.chat and len(task.test) == 5 and len(task.train) == 15
    assert {r["prompt"] for r in task.train + task.test} == {r["q"] for r in rows}

    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"#### {i}"}]}
             for i in range(10)]
    task = D.load_task("causal-lm", data=write(tmp_path / "chat.jsonl", chats, "jsonl"))
    assert task.chat and task.train[0]["completion"][0]["role"] == "assistant"
    assert D.extract_answer(task.test[0]["completion"][0]["content"], task.answer_pattern).isdigit()

    with pytest.raises(SubspacesError, match="columns found: q, a"):
        D.load_task("causal-lm", data=path)
    bad = [{"messages": [{"role": "user", "content": "hi"}]}] * 3
    with pytest.raises(SubspacesError, match="last message must be the assistant"):
        D.load_task("causal-lm", data=write(tmp_path / "bad.jsonl", bad, "jsonl"))
    with pytest.raises(SubspacesError, match="not a valid regular expression"):
        D.load_task("causal-lm", data=path, prompt_column="q", completion_column="a", answer_pattern="(")


def test_arithmetic_task_is_deterministic_and_checkable():
    a, b = D.load_task("arithmetic", seed=0), D.load_task("arithmetic", seed=1)
    assert len(a.train) == 400 and len(a.test) == 100 and a == D.load_task("arithmetic", seed=0)
    assert a.test != b.test and sorted(map(str, a.train + a.test)) == sorted(map(str, b.train + b.test))
    assert not {r["prompt"] for r in a.train} & {r["prompt"] for r in a.test}
    for row in a.train + a.test:  # every worked answer is right and ends in GSM8K's answer line
        steps = row["completion"].split("\n")[0].rstrip(".").split(". ")
        for step in steps:
            lhs, rhs = step.split(" = ")
            assert eval(lhs.replace("/", "//")) == int(rhs)  # noqa: S307 (our own generated digits)
        assert D.extract_answer(row["completion"], a.answer_pattern) == steps[-1].split(" = ")[1]


def test_extract_answer_normalizes():
    assert D.extract_answer("so #### 1,234.0 done", D.GSM8K_ANSWER) == "1234"
    assert D.extract_answer("no answer line", D.GSM8K_ANSWER) is None
    assert D.extract_answer("  yes ", None) == "yes"
    assert D.last_number("12 - 7 = 5 dollars, so 1,005.0 in all") == "1005" and D.last_number("none") is None
