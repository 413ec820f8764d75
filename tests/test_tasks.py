"""The DataInf-style task generators follow BENCHMARKS.md exactly: formats, classes, answers, noise."""

import re
from collections import Counter

import pyarrow.json as pj
import pyarrow.parquet as pq
import pytest

from forvalue_ray.tasks import SENTENCE_TRANSFORMS, TASKS, WORDS, make_task, write_task

PHRASE = "the big red dog"
EXPECTED = [  # hand-computed, in the order BENCHMARKS.md lists the transformations
    "dog red big the",
    "tHe bIg rEd dOg",
    "the 1 big 1 red 1 dog",
    "th* b*g r*d d*g",
    "tthhe bbigg rredd ddogg",
    "The Big Red Dog",
    "th bg rd dg",
    "thely bigly redly dogly",
    "e i e o",
    "the the big big red red dog dog",
]
SENTENCE_RE = re.compile(r"(\w+) is a chatbot that performs a specific transformation on sentences: (.+)\n"
                         r"    For example:\n    (.+) ->")

# (a word the question must contain, the answer from the integers A, B, C, D in question order)
MATH = [
    ("pizza", lambda a, b, c: c - (a + b)),
    ("field trip", lambda a, b, c: (b * c) // a),
    ("sharks", lambda a, b, c: a + c),
    ("basketball", lambda a, b, c, d: a + b + c + d),
    ("reads", lambda a, b: a * b),
    ("discount", lambda a, b: a - b),
    ("rectangle", lambda a, b: a * b),
    ("saves", lambda a, b: a * b),
    ("cupcakes", lambda a, b: b // a),
    ("interest", lambda a, b, c: (a * b * c) // 100),
]
MATH_PROMPT_RE = re.compile(r"Solve the following math problem\. (.+) ->")


@pytest.mark.parametrize("task", TASKS)
def test_sizes_classes_and_format(task):
    train, val = make_task(task)
    assert (len(train), len(val)) == (900, 100)
    assert Counter(r["class"] for r in train) == {c: 90 for c in range(10)}
    assert Counter(r["class"] for r in val) == {c: 10 for c in range(10)}
    assert [r["id"] for r in train[:2]] == [f"{task}-train-00000", f"{task}-train-00001"]
    assert train[-1]["id"] == f"{task}-train-00899" and val[-1]["id"] == f"{task}-val-00099"
    assert len({r["id"] for r in train + val}) == 1000
    for r in train + val:
        assert set(r) == {"id", "text", "prompt", "response", "class", "corrupted"}
        assert r["text"] == r["prompt"] + r["response"]
        assert r["prompt"].endswith("->") and r["response"].endswith("</s>") and r["response"][0] == " "
        assert r["corrupted"] is False


def test_sizes_follow_arguments():
    train, val = make_task("math", n_classes=4, n_train_per_class=5, n_val_per_class=2)
    assert Counter(r["class"] for r in train) == {c: 5 for c in range(4)}
    assert Counter(r["class"] for r in val) == {c: 2 for c in range(4)}


@pytest.mark.parametrize("cls", range(10))
def test_each_transformation_on_a_hand_computed_example(cls):
    assert SENTENCE_TRANSFORMS[cls][1](PHRASE) == EXPECTED[cls]


def test_word_list_keeps_every_transformation_non_degenerate():
    assert len(WORDS) >= 200 and len(set(WORDS)) == len(WORDS)
    for w in WORDS:
        assert w.isalpha() and w.islower() and set(w) & set("aeiou") and set(w) - set("aeiou")


def test_sentence_rows():
    train, val = make_task("sentence")
    names, phrases = {}, {"train": {}, "val": {}}
    for split, rows in (("train", train), ("val", val)):
        for r in rows:
            name, title, phrase = SENTENCE_RE.fullmatch(r["prompt"]).groups()
            assert title == SENTENCE_TRANSFORMS[r["class"]][0]
            assert r["text"] == (f"{name} is a chatbot that performs a specific transformation on sentences: "
                                 f"{title}\n    For example:\n    {phrase} -> " + " "
                                 + SENTENCE_TRANSFORMS[r["class"]][1](phrase) + "</s>")
            assert 3 <= len(phrase.split()) <= 5 and set(phrase.split()) <= set(WORDS)
            assert names.setdefault(r["class"], name) == name  # one chatbot name per class
            phrases[split].setdefault(r["class"], []).append(phrase)
    assert len(set(names.values())) == 10
    for split, n in (("train", 90), ("val", 10)):  # the same phrase pool, in the same order, in every class
        pools = phrases[split]
        assert len(set(pools[0])) == n and all(pools[c] == pools[0] for c in range(10))
    assert not set(phrases["train"][0]) & set(phrases["val"][0])


@pytest.mark.parametrize("task", ["math", "math_reason"])
def test_math_answers_recomputed_from_the_question(task):
    train, val = make_task(task)
    for r in train + val:
        question = MATH_PROMPT_RE.fullmatch(r["prompt"]).group(1)
        keyword, formula = MATH[r["class"]]
        assert keyword in question
        nums = [int(x) for x in re.findall(r"\d+", question)]
        assert all(1 <= x <= 99 for x in nums)
        answer = formula(*nums)
        assert answer >= 1
        if task == "math":
            assert r["response"] == f" Answer: {answer}</s>"
        else:
            reason, got = re.fullmatch(r" Reason: (.+\.) Answer: (\d+)</s>", r["response"]).groups()
            assert int(got) == answer
            assert {int(x) for x in re.findall(r"\d+", reason)} - {100} <= set(nums)
            if r["class"] == 2:  # the BENCHMARKS.md example, literally
                assert reason == f"Total sharks = {nums[0]} + {nums[2]}."


def test_math_tasks_share_problems_and_differ_by_the_reason():
    for plain, reasoned in zip(*(make_task(t, noise=0.2)[0] for t in ("math", "math_reason"))):
        assert plain["prompt"] == reasoned["prompt"] and plain["corrupted"] == reasoned["corrupted"]
        assert re.sub(r" Reason: .+\.(?= Answer:)", "", reasoned["response"]) == plain["response"]


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_seed_sensitive(task):
    assert make_task(task, seed=3, noise=0.2) == make_task(task, seed=3, noise=0.2)
    a, b = make_task(task, seed=0)[0], make_task(task, seed=1)[0]
    assert sum(x["text"] != y["text"] for x, y in zip(a, b)) > 800


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("noise,sizes", [(0.2, {}), (0.5, {}), (0.3, dict(n_classes=3, n_train_per_class=7))])
def test_noise(task, noise, sizes):
    clean_train, clean_val = make_task(task, seed=5, **sizes)
    train, val = make_task(task, seed=5, noise=noise, **sizes)
    n_bad = sum(r["corrupted"] for r in train)
    assert n_bad == round(noise * len(train)) > 0
    assert val == clean_val  # validation is never corrupted
    n_classes = sizes.get("n_classes", 10)
    for r, c in zip(train, clean_train):
        assert r["prompt"] == c["prompt"] and r["class"] == c["class"] and r["id"] == c["id"]
        if not r["corrupted"]:
            assert r == c
            continue
        assert r["response"] != c["response"] and r["text"] == r["prompt"] + r["response"]
        if task == "sentence":  # another class's transformation of the same phrase
            phrase = SENTENCE_RE.fullmatch(r["prompt"]).group(3)
            others = {fn(phrase) for k, (_, fn) in enumerate(SENTENCE_TRANSFORMS[:n_classes]) if k != r["class"]}
            assert r["response"][2:-len("</s>")] in others
        else:  # the same reason (if any), a different answer
            head, wrong = re.fullmatch(r"(.*) Answer: (\d+)</s>", r["response"]).groups()
            head_c, right = re.fullmatch(r"(.*) Answer: (\d+)</s>", c["response"]).groups()
            assert head == head_c and wrong != right


def test_noise_edges():
    assert all(r["corrupted"] for r in make_task("sentence", noise=1.0)[0])
    assert not any(r["corrupted"] for r in make_task("math", noise=0.0)[0])
    with pytest.raises(ValueError):
        make_task("sentence", n_classes=1, noise=0.5)
    with pytest.raises(ValueError):
        make_task("math", noise=1.5)
    with pytest.raises(ValueError):
        make_task("poetry")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize("task", TASKS)
def test_write_task_round_trip(tmp_path, task, fmt):
    paths = write_task(task, tmp_path / "out", seed=2, noise=0.2, fmt=fmt)
    assert paths == {"train": str(tmp_path / "out" / f"train.{fmt}"), "val": str(tmp_path / "out" / f"val.{fmt}")}
    read = pq.read_table if fmt == "parquet" else pj.read_json
    for (split, path), rows in zip(paths.items(), make_task(task, seed=2, noise=0.2)):
        assert read(path).to_pylist() == rows, split
