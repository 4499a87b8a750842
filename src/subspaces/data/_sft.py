"""Supervised fine-tuning tasks for causal LMs: rows of prompt and completion (or chat messages), an answer pattern
for generative accuracy, and the embedded ``arithmetic`` task.

``arithmetic`` is generated in code, deterministically: GSM8K-style two-step word problems over small numbers, each
with a short worked answer ending in GSM8K's ``#### <number>`` line. A small instruct model does not know the answer
format zero-shot and gets the arithmetic partly wrong; a few hundred fine-tuning steps teach both, so the methods
separate on it (docs/results.md).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: GSM8K's final-answer line, ``#### 42`` (thousands separators and a sign allowed).
GSM8K_ANSWER = r"####\s*(-?[\d,]*\.?\d+)"


@dataclass
class SFTTask:
    """Rows for a causal LM: ``{"prompt": str, "completion": str}``, or ``{"prompt": [messages], "completion":
    [assistant message]}`` for chat data (rendered with the tokenizer's chat template). The loss is taken on the
    completion only. ``answer_pattern`` (a regex whose first group is the answer) scores generations."""

    kind: ClassVar[str] = "causal-lm"
    name: str
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    answer_pattern: str | None = GSM8K_ANSWER
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def chat(self) -> bool:
        return bool(self.train) and not isinstance(self.train[0]["prompt"], str)

    def __repr__(self) -> str:
        return f"SFTTask(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, chat={self.chat})"


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The normalized answer in ``text``: the first group of ``pattern``'s first match (the whole text stripped
    when ``pattern`` is None), commas and a trailing ``.0`` removed; None where nothing matches."""
    if pattern is None:
        answer = text.strip()
    else:
        m = re.search(pattern, text)
        if m is None:
            return None
        answer = (m.group(1) if m.groups() else m.group(0)).strip()
    answer = answer.replace(",", "")
    if re.fullmatch(r"-?\d+\.0*", answer):
        answer = answer.split(".")[0]
    return answer


def last_number(text: str) -> str | None:
    """The last number in ``text``, normalized as :func:`extract_answer` does (lm-eval's "flexible extract" of
    GSM8K); None when there is none."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return extract_answer(numbers[-1], None) if numbers else None


# --------------------------------------------------------------------------- the embedded arithmetic task

_NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kira", "Liam",
          "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zoe")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "beads", "books")


def _problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked answer, result) from one of six templates: two operations on small numbers."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 19), rng.randint(2, 9), rng.randint(2, 19)
    kind = rng.randrange(6)
    if kind == 0:
        c = rng.randint(2, a + b)
        q = (f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to a friend. "
             f"How many {item} does {name} have now?")
        return q, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c
    if kind == 1:
        q = (f"{name} buys {a} packs of {item} with {b} {item} in each pack. {name} already had {c} {item}. "
             f"How many {item} does {name} have now?")
        return q, f"{a} * {b} = {a * b}. {a * b} + {c} = {a * b + c}.", a * b + c
    if kind == 2:
        c = rng.randint(2, a * b)
        q = f"A box holds {b} {item}. {name} fills {a} boxes and then uses {c} of the {item}. How many {item} are left?"
        return q, f"{a} * {b} = {a * b}. {a * b} - {c} = {a * b - c}.", a * b - c
    if kind == 3:
        c = rng.randint(2, a * b)
        q = (f"{name} earns {b} dollars an hour and works {a} hours. Then {name} spends {c} dollars. "
             f"How many dollars does {name} have left?")
        return q, f"{b} * {a} = {a * b}. {a * b} - {c} = {a * b - c}.", a * b - c
    if kind == 4:
        q = (f"{name} shares {a * b} {item} equally among {b} friends. Each friend already had {c} {item}. "
             f"How many {item} does each friend have now?")
        return q, f"{a * b} / {b} = {a}. {a} + {c} = {a + c}.", a + c
    q = (f"{name} has {a} red {item} and {c} blue {item}. A friend has {b} times as many {item} as {name}. "
         f"How many {item} does the friend have?")
    return q, f"{a} + {c} = {a + c}. {a + c} * {b} = {(a + c) * b}.", (a + c) * b


def arithmetic_task(*, seed: int = 0, n_train: int = 400, n_test: int = 100) -> SFTTask:
    """GSM8K-style two-step word problems (six templates, numbers up to 19 and 9, answers up to 342) with a worked
    answer and ``#### N``. The problems are the same for every ``seed`` (generated once with a fixed generator,
    each question once); ``seed`` picks the train / test split. The default size (one epoch = 50 steps of 8) keeps
    zero-shot, LoRA, GaLore and full fine-tuning of SmolLM2-135M within 15 minutes on 2 CPU cores."""
    for n, what in ((n_train, "n_train"), (n_test, "n_test")):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{what}={n!r}: must be a positive integer")
    rng, seen, rows = random.Random(20261204), set(), []
    while len(rows) < n_train + n_test:
        question, work, result = _problem(rng)
        if question not in seen:
            seen.add(question)
            rows.append({"prompt": f"Question: {question}\nAnswer:", "completion": f" {work}\n#### {result}"})
    random.Random(seed).shuffle(rows)
    return SFTTask("arithmetic", train=rows[n_test:], test=rows[:n_test], answer_pattern=GSM8K_ANSWER,
                   meta={"seed": seed, "generator": "subspaces.data._sft.arithmetic_task"})
