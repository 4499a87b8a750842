"""subspaces.data: the embedded offline tasks and corpora. Properties, not exact counts (counts shift
slightly between Python versions)."""

import subprocess
import sys
from collections import Counter

import pytest

import subspaces.data as D
from subspaces.data import _stdlib


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache for this module, so the tests neither read nor write the user's cache."""
    path = tmp_path_factory.mktemp("subspaces-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUBSPACES_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def task(cache):
    return D.docstring_task()


def _counts(t):
    return Counter(t.train_labels), Counter(t.test_labels)


def test_import_is_cheap():
    code = (
        "import sys, subspaces.data; "
        "print(','.join(m for m in ('transformers', 'sklearn', 'mlxtend', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_docstring_task_shape(task):
    assert task.name == "docstring"
    assert task.label_names == list(D.DOCSTRING_PACKAGES)
    assert task.num_labels == 8
    n = len(task.train_texts) + len(task.test_texts)
    assert n >= 1500
    assert len(task.train_texts) == len(task.train_labels)
    assert len(task.test_texts) == len(task.test_labels)
    train, test = _counts(task)
    assert set(train) == set(test) == set(range(8))
    assert all(train[y] + test[y] >= 50 for y in range(8))
    texts = task.train_texts + task.test_texts
    assert all(len(t) > 40 for t in texts)
    assert all("  " not in t and "\n" not in t and t == t.strip() for t in texts)
    assert "TextTask(name='docstring'" in repr(task) and len(repr(task)) < 200


def test_docstring_split_deterministic_and_disjoint(task, cache):
    again = D.docstring_task(seed=0)
    assert again == task
    other = D.docstring_task(seed=1)
    assert other.train_texts != task.train_texts
    assert sorted(other.train_texts + other.test_texts) == sorted(task.train_texts + task.test_texts)
    texts = task.train_texts + task.test_texts
    assert len(set(texts)) == len(texts)  # deduplicated, so no text in both train and test
    assert not set(task.train_texts) & set(task.test_texts)


def test_docstring_split_is_stratified(task):
    train, test = _counts(task)
    for y in range(task.num_labels):
        n = train[y] + test[y]
        assert abs(test[y] - 0.2 * n) <= 1
    half = D.docstring_task(test_fraction=0.5)
    train, test = _counts(half)
    assert all(abs(test[y] - train[y]) <= 1 for y in range(8))


def test_docstring_cache_hit_returns_identical_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPACES_CACHE", str(tmp_path))
    packages = ("json", "csv", "http")  # small, for speed
    first = D.docstring_task(packages, min_chars=20)
    files = list(tmp_path.rglob("*.json"))
    assert {f.stem for f in files} == set(packages)
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]

    def no_parsing(path):
        raise AssertionError("cache miss: the stdlib was parsed again")

    monkeypatch.setattr(_stdlib, "_docstrings", no_parsing)
    assert D.docstring_task(packages, min_chars=20) == first


def test_cache_key_has_python_version(cache, task):
    version = ".".join(map(str, sys.version_info[:3]))
    path = _stdlib._cache_file("asyncio")
    assert path.is_file() and str(cache) in str(path)
    assert version in str(path) and path.stem == "asyncio"


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPACES_CACHE", str(tmp_path))
    good = _stdlib.package_docstrings("csv")
    _stdlib._cache_file("csv").write_text("{not json")
    assert _stdlib.package_docstrings("csv") == good


def test_test_directories_are_skipped():
    files = _stdlib._package_files("unittest") + _stdlib._package_files("tkinter")
    assert files
    assert not [f for f in files if {"test", "tests"} & set(f.parts) or f.name.startswith("test_")]
    assert _stdlib._package_files("csv") == [_stdlib.stdlib_dir() / "csv.py"]
    with pytest.raises(ValueError, match="nonexistent_pkg"):
        _stdlib._package_files("nonexistent_pkg")


def test_deduplicate_drops_ambiguous_texts():
    pairs = [("a", "x"), ("b", "x"), ("a", "x"), ("c", "x"), ("c", "y"), ("d", "y")]
    assert D._deduplicate(pairs) == [("a", "x"), ("b", "x"), ("d", "y")]


def test_split_arguments_are_validated(cache):
    with pytest.raises(ValueError, match="test_fraction"):
        D.docstring_task(test_fraction=1.0)
    with pytest.raises(ValueError, match="two distinct packages"):
        D.docstring_task(("asyncio", "asyncio"))


@pytest.mark.parametrize("group", sorted(D.PACKAGE_GROUPS))
def test_package_groups(cache, group):
    t = D.package_group_task(group)
    assert t.name == group and t.label_names == list(D.PACKAGE_GROUPS[group])
    train, test = _counts(t)
    assert len(t.train_texts) + len(t.test_texts) >= 200
    assert all(train[y] + test[y] >= 20 for y in range(t.num_labels))
    assert not set(t.train_texts) & set(t.test_texts)


def test_load_task_and_registry(cache):
    assert set(D.TASKS) == {
        "docstring", "concurrency", "net", "formats", "devtools", "chatterbot-topics", "chatterbot-languages",
        "arithmetic",
    }
    assert D.TASKS["net"]() == D.load_task("net") == D.package_group_task("net")
    assert D.load_task("docstring", seed=3) == D.docstring_task(seed=3)
    with pytest.raises(ValueError, match="unknown task .docstrings.*Valid: arithmetic, chatterbot-languages") as e:
        D.load_task("docstrings")
    assert "Did you mean 'docstring'" in str(e.value)
    with pytest.raises(ValueError, match="package group"):
        D.package_group_task("nope")


def test_chatterbot_topics():
    t = D.chatterbot_topics()
    assert t.num_labels >= 15 and "ai" in t.label_names and "greetings" in t.label_names
    assert len(t.train_texts) + len(t.test_texts) >= 1000
    assert not set(t.train_texts) & set(t.test_texts)
    assert D.chatterbot_topics(seed=0) == t and D.chatterbot_topics(seed=1) != t


def test_chatterbot_languages():
    t = D.chatterbot_languages()
    assert t.num_labels >= 20 and {"english", "french", "chinese"} <= set(t.label_names)
    assert len(t.train_texts) + len(t.test_texts) >= 5000
    assert set(t.train_labels) == set(range(t.num_labels))
    assert not set(t.train_texts) & set(t.test_texts)


def test_mnist5k():
    import torch

    X, y = D.mnist5k()
    assert X.shape == (5000, 784) and X.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert X.min() >= 0 and X.max() <= 1 and X.max() == 1
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))


def test_pydoc_corpus():
    text = D.pydoc_corpus()
    assert isinstance(text, str) and len(text) > 100_000
    assert "for" in text and text == D.pydoc_corpus()
