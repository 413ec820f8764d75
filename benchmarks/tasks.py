"""Seeded generators for the three DataInf-style influential-data tasks (the DataInf paper's protocol), plus a
reasoning-style variant of the math task whose responses are multi-line step-by-step solutions.

The sentence task is the package's own (``forvalue_ray.sample_data``: the demo's corpus); this module adds the math
tasks and the span corruptions. Each task has ten classes; a training row is "influential" for a validation row when
both share a class, so class-level AUC/recall measure how well a valuation recovers that structure. With ``noise``
a fraction of training responses is corrupted for the noisy-data detection benchmarks; validation rows
stay clean so they can serve as the target. Two kinds of corruption:

- ``"task"``: the task's own mislabeling — another class's transformation (sentence), a wrong answer (math);
- ``"spans"`` / ``"spans_keep_lines"``: the For-Value paper's LLM noisy-data protocol — on the whitespace
  tokens of the response, span deletion or span insertion (:func:`delete_spans`, :func:`insert_spans`).
  ``"spans"`` rejoins the tokens with single spaces as the paper does, which also removes the newlines of
  noisy rows only (a surface cue); ``"spans_keep_lines"`` keeps every surviving token on its own line.

Pure Python + pyarrow so the data can be built anywhere, without a model. Two independent random
streams are used, one for the clean content and one for the corruption, so the clean rows of a noisy
call are exactly the rows of the noise-free call with the same seed.
"""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from forvalue_ray.sample_data import distinct, sentence_task, task_row, task_streams

TASKS = ("sentence", "math", "math_reason")  # the DataInf tasks
STEPS_TASK = "math_steps"  # the math problems, answered by a multi-line step-by-step solution
CORRUPTIONS = ("task", "spans", "spans_keep_lines")

SPAN_PROBABILITY = 0.2  # chance, at each token, that a span is deleted there or inserted after it
SPAN_MEAN = 3.0  # span length: max(1, floor(X)) with X ~ Exponential(mean 3)
INSERTED_WORDS = ("foo", "bar", "baz")
_MAX_CORRUPTION_DRAWS = 1000


class _Template(NamedTuple):
    """One math class: draw its integers, phrase the question, the one-line reason and the step-by-step
    solution (one line per step), compute the answer."""
    draw: Callable[[random.Random], tuple[int, ...]]
    question: Callable[..., str]
    reason: Callable[..., str]
    answer: Callable[..., int]
    steps: Callable[..., tuple[str, ...]]


def _ints(k: int) -> Callable[[random.Random], tuple[int, ...]]:
    return lambda rng: tuple(rng.randint(1, 99) for _ in range(k))


def _draw_pizza(rng: random.Random) -> tuple[int, ...]:
    """C > A + B, so that some slices are left."""
    a = rng.randint(1, 97)
    b = rng.randint(1, 98 - a)
    return a, b, rng.randint(a + b + 1, 99)


def _draw_field_trip(rng: random.Random) -> tuple[int, ...]:
    """A ≤ B·C, so that at least one adult is needed."""
    b, c = rng.randint(1, 99), rng.randint(1, 99)
    return rng.randint(1, min(99, b * c)), b, c


def _draw_discount(rng: random.Random) -> tuple[int, ...]:
    """B < A, so that the price stays positive."""
    a = rng.randint(2, 99)
    return a, rng.randint(1, a - 1)


def _draw_cupcakes(rng: random.Random) -> tuple[int, ...]:
    """A ≤ B, so that at least one box is filled."""
    b = rng.randint(1, 99)
    return rng.randint(1, b), b


def _draw_interest(rng: random.Random) -> tuple[int, ...]:
    """A·B·C ≥ 100, so that the interest is at least one dollar."""
    while True:
        a, b, c = (rng.randint(1, 99) for _ in range(3))
        if a * b * c >= 100:
            return a, b, c


# The integers appear in each question in the order A, B, C, D (a test parses them back out).
MATH_TEMPLATES: tuple[_Template, ...] = (
    _Template(_draw_pizza,
              lambda a, b, c: f"Alice eats {a} slices and Bob eats {b} slices of a pizza that was cut into "
                              f"{c} slices. How many slices are left?",
              lambda a, b, c: f"Slices left = {c} - ({a} + {b}).",
              lambda a, b, c: c - (a + b),
              lambda a, b, c: (f"Alice and Bob eat {a} + {b} = {a + b} slices.", f"The pizza has {c} slices.",
                               f"Slices left = {c} - {a + b} = {c - a - b}.")),
    _Template(_draw_field_trip,
              lambda a, b, c: f"A school sends one adult with every full group of {a} students. {b} classes "
                              f"of {c} students each go on a field trip. How many adults are needed?",
              lambda a, b, c: f"Adults needed = ({b} * {c}) / {a}, rounded down.",
              lambda a, b, c: (b * c) // a,
              lambda a, b, c: (f"There are {b} * {c} = {b * c} students.",
                               f"One adult goes with every {a} students.",
                               f"Adults needed = {b * c} / {a}, rounded down = {b * c // a}.")),
    _Template(_ints(3),
              lambda a, b, c: f"An aquarium has {a} sharks and {b} rays in one tank and {c} sharks in "
                              f"another tank. How many sharks are there in the aquarium?",
              lambda a, b, c: f"Total sharks = {a} + {c}.",
              lambda a, b, c: a + c,
              lambda a, b, c: (f"The first tank has {a} sharks; its {b} rays are not sharks.",
                               f"The second tank has {c} sharks.", f"Total sharks = {a} + {c} = {a + c}.")),
    _Template(_ints(4),
              lambda a, b, c, d: f"A basketball player scored {a}, {b}, {c} and {d} points in four games. "
                                 f"How many points did the player score in total?",
              lambda a, b, c, d: f"Total points = {a} + {b} + {c} + {d}.",
              lambda a, b, c, d: a + b + c + d,
              lambda a, b, c, d: (f"After two games: {a} + {b} = {a + b} points.",
                                  f"After three games: {a + b} + {c} = {a + b + c} points.",
                                  f"After four games: {a + b + c} + {d} = {a + b + c + d} points.")),
    _Template(_ints(2),
              lambda a, b: f"Emma reads for {a} hours every day. How many hours does she read in {b} days?",
              lambda a, b: f"Total hours = {a} * {b}.",
              lambda a, b: a * b,
              lambda a, b: (f"Emma reads {a} hours every day.", f"She reads for {b} days.",
                            f"Total hours = {a} * {b} = {a * b}.")),
    _Template(_draw_discount,
              lambda a, b: f"A jacket costs {a} dollars and is on sale for {b} dollars off. What is the "
                           f"price after the discount?",
              lambda a, b: f"Price after discount = {a} - {b}.",
              lambda a, b: a - b,
              lambda a, b: (f"The jacket costs {a} dollars.", f"The discount is {b} dollars.",
                            f"Price after discount = {a} - {b} = {a - b}.")),
    _Template(_ints(2),
              lambda a, b: f"A rectangle is {a} meters long and {b} meters wide. What is its area in square "
                           f"meters?",
              lambda a, b: f"Area = {a} * {b}.",
              lambda a, b: a * b,
              lambda a, b: (f"The rectangle is {a} meters long and {b} meters wide.", "Area = length * width.",
                            f"Area = {a} * {b} = {a * b}.")),
    _Template(_ints(2),
              lambda a, b: f"Sam saves {a} dollars every week. How many dollars does he save in {b} weeks?",
              lambda a, b: f"Total savings = {a} * {b}.",
              lambda a, b: a * b,
              lambda a, b: (f"Sam saves {a} dollars every week.", f"He saves for {b} weeks.",
                            f"Total savings = {a} * {b} = {a * b}.")),
    _Template(_draw_cupcakes,
              lambda a, b: f"Each box holds {a} cupcakes. A baker has {b} cupcakes. How many boxes can be "
                           f"filled completely?",
              lambda a, b: f"Full boxes = {b} / {a}, rounded down.",
              lambda a, b: b // a,
              lambda a, b: (f"The baker has {b} cupcakes.", f"Each box holds {a} cupcakes.",
                            f"Full boxes = {b} / {a}, rounded down = {b // a}.")),
    _Template(_draw_interest,
              lambda a, b, c: f"Mia deposits {a} dollars at a simple interest rate of {b} percent per year "
                              f"for {c} years. How many whole dollars of interest does she earn?",
              lambda a, b, c: f"Interest = ({a} * {b} * {c}) / 100, rounded down.",
              lambda a, b, c: (a * b * c) // 100,
              lambda a, b, c: (f"Each year the interest is {b} percent of {a} dollars.",
                               f"Over {c} years: {a} * {b} * {c} = {a * b * c} hundredths of a dollar.",
                               f"Whole dollars = {a * b * c} / 100, rounded down = {a * b * c // 100}.")),
)

_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("prompt", pa.string()),
                     ("response", pa.string()), ("class", pa.int64()), ("corrupted", pa.bool_())])


def _wrong_answer(nrng: random.Random, answer: int) -> int:
    """A nearby non-negative integer other than the answer: a plausible arithmetic slip."""
    return answer + nrng.choice([d for d in range(-10, 11) if d and answer + d >= 0])


def _span_length(rng: random.Random) -> int:
    return max(1, int(rng.expovariate(1.0 / SPAN_MEAN)))


def delete_spans(tokens: list, rng: random.Random, p: float = SPAN_PROBABILITY) -> list:
    """Walk the tokens; at each one, with probability p, skip a span of tokens starting there."""
    out, i = [], 0
    while i < len(tokens):
        if rng.random() < p:
            i += _span_length(rng)
        else:
            out.append(tokens[i])
            i += 1
    return out


def insert_spans(tokens: list, rng: random.Random, p: float = SPAN_PROBABILITY,
                 make=lambda after, word: word) -> list:
    """Keep every token; after each, with probability p, insert a span of words drawn from INSERTED_WORDS
    (``make(token, word)`` builds the inserted token from the one it follows)."""
    out = []
    for t in tokens:
        out.append(t)
        if rng.random() < p:
            out += [make(t, rng.choice(INSERTED_WORDS)) for _ in range(_span_length(rng))]
    return out


def corrupt_spans(content: str, rng: random.Random, keep_lines: bool) -> str:
    """Span deletion or insertion (one of the two, with equal chance) on the whitespace tokens of ``content``.

    Without ``keep_lines`` the tokens are rejoined with single spaces (the paper's protocol); with it each
    surviving token stays on its line (an inserted one on the line of the token it follows), lines left
    empty are dropped and lines are rejoined with newlines. Redrawn until the tokens change and some remain.
    """
    tokens = [(line, w) for line, text in enumerate(content.split("\n")) for w in text.split()]
    for _ in range(_MAX_CORRUPTION_DRAWS):
        if rng.random() < 0.5:
            out = delete_spans(tokens, rng)
        else:
            out = insert_spans(tokens, rng, make=lambda after, word: (after[0], word))
        if out and [w for _, w in out] != [w for _, w in tokens]:
            break
    else:
        raise ValueError(f"no span corruption changes {content!r}")
    if not keep_lines:
        return " ".join(w for _, w in out)
    lines: dict[int, list[str]] = {}
    for line, w in out:
        lines.setdefault(line, []).append(w)
    return "\n".join(" ".join(ws) for ws in lines.values())


def _corrupt_response(response: str, rng: random.Random, corruption: str) -> str:
    """Span corruption of the response's content; its leading whitespace and the ``</s>`` end are kept."""
    content = response[: -len("</s>")]
    lead = content[: len(content) - len(content.lstrip())]
    return lead + corrupt_spans(content[len(lead):], rng, keep_lines=corruption == "spans_keep_lines") + "</s>"


def _math(task: str, rng: random.Random, nrng: random.Random, n_classes: int, n_train: int, n_val: int,
          corrupt: set[int], corruption: str) -> tuple[list[dict], list[dict]]:
    train, val = [], []
    for cls in range(n_classes):
        tpl = MATH_TEMPLATES[cls]
        for j, nums in enumerate(distinct(lambda: tpl.draw(rng), n_train + n_val, "questions")):
            i = cls * n_train + j if j < n_train else cls * n_val + j - n_train
            bad = j < n_train and i in corrupt
            answer = tpl.answer(*nums)
            if bad and corruption == "task":
                answer = _wrong_answer(nrng, answer)
            if task == STEPS_TASK:
                response = " " + "\n".join(tpl.steps(*nums)) + f"\nAnswer: {answer}</s>"
            else:
                reason = f" Reason: {tpl.reason(*nums)}" if task == "math_reason" else ""
                response = f"{reason} Answer: {answer}</s>"
            if bad and corruption != "task":
                response = _corrupt_response(response, nrng, corruption)
            rows = train if j < n_train else val
            rows.append(task_row(task, "train" if j < n_train else "val", i,
                                 f"Solve the following math problem. {tpl.question(*nums)} ->", response, cls, bad))
    return train, val


def make_task(task: str, *, seed: int = 0, n_classes: int = 10, n_train_per_class: int = 90,
              n_val_per_class: int = 10, noise: float = 0.0, corruption: str = "task") -> tuple[list[dict], list[dict]]:
    """(train_rows, val_rows) of one task, class-major; ``noise`` corrupts round(noise·n_train) train rows
    with ``corruption`` (one of CORRUPTIONS, see the module docstring).

    Rows carry ``id``, ``text`` (= ``prompt`` + ``response``, the DataInf format), ``prompt``,
    ``response``, ``class`` and ``corrupted``. The same arguments always give the same rows; "math",
    "math_reason" and "math_steps" with the same seed pose the same problems and corrupt the same rows,
    so they differ only by the reasoning before the answer.
    """
    if task not in TASKS + (STEPS_TASK,):
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS + (STEPS_TASK,)}")
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {CORRUPTIONS}")
    if task == "sentence":
        spans = None if corruption == "task" else partial(_corrupt_response, corruption=corruption)
        return sentence_task(seed=seed, n_classes=n_classes, n_train_per_class=n_train_per_class,
                             n_val_per_class=n_val_per_class, noise=noise, corrupt_response=spans)
    # every math task: the same problems, the same noise
    rng, nrng, corrupt = task_streams("math", seed, n_classes, n_train_per_class, n_val_per_class, noise)
    return _math(task, rng, nrng, n_classes, n_train_per_class, n_val_per_class, corrupt, corruption)


def write_task(task: str, out_dir, *, seed: int = 0, noise: float = 0.0, corruption: str = "task",
               fmt: str = "parquet") -> dict:
    """Write ``train`` and ``val`` of :func:`make_task` under ``out_dir``; returns {"train": path, "val": path}."""
    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"fmt must be 'parquet' or 'jsonl', got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in zip(("train", "val"), make_task(task, seed=seed, noise=noise, corruption=corruption)):
        path = out / f"{split}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        paths[split] = str(path)
    return paths
