"""The DataInf-style task generators follow the DataInf task definitions exactly: formats, classes, answers, noise; the
reasoning-style task and the paper's span corruption on hand-checked cases."""

import math
import random
import re
from collections import Counter

import pyarrow.json as pj
import pyarrow.parquet as pq
import pytest

from forvalue_ray.sample_data import SENTENCE_TRANSFORMS, WORDS
from tasks import INSERTED_WORDS, STEPS_TASK, TASKS, corrupt_spans, delete_spans, insert_spans, make_task, write_task

PHRASE = "the big red dog"
EXPECTED = [  # hand-computed, in the order sample_data.py lists the transformations
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
            if r["class"] == 2:  # the DataInf paper's example, literally
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


# ---- the reasoning-style task and the paper's span corruption ------------------------------------------------


class Scripted:
    """A random source replaying fixed draws: uniforms for random(), exponentials, indices for choice()."""

    def __init__(self, uniforms=(), exponentials=(), choices=()):
        self.uniforms, self.exponentials, self.choices = list(uniforms), list(exponentials), list(choices)

    def random(self):
        return self.uniforms.pop(0)

    def expovariate(self, rate):
        assert rate == 1 / 3  # spans of mean 3
        return self.exponentials.pop(0)

    def choice(self, seq):
        return seq[self.choices.pop(0)]

    def exhausted(self):
        return not (self.uniforms or self.exponentials or self.choices)


def test_delete_spans_by_hand():
    # a: keep; b: hit, Exp 2.9 -> span 2 (b, c); d, e: keep; f: hit, Exp 0.4 -> span max(1, 0) = 1
    rng = Scripted(uniforms=[0.5, 0.1, 0.9, 0.3, 0.05], exponentials=[2.9, 0.4])
    assert delete_spans(list("abcdef"), rng) == list("ade") and rng.exhausted()
    rng = Scripted(uniforms=[0.19], exponentials=[7.2])  # a span longer than what is left ends the walk
    assert delete_spans(list("abc"), rng) == [] and rng.exhausted()


def test_insert_spans_by_hand():
    # after a: Exp 3.5 -> 3 words (baz foo bar); b: nothing; after c: Exp 0.2 -> 1 word (bar)
    rng = Scripted(uniforms=[0.1, 0.5, 0.15], exponentials=[3.5, 0.2], choices=[2, 0, 1, 1])
    assert insert_spans(list("abc"), rng) == ["a", "baz", "foo", "bar", "b", "c", "bar"] and rng.exhausted()
    assert INSERTED_WORDS == ("foo", "bar", "baz")


def test_corrupt_spans_rejoins_with_spaces_or_keeps_lines():
    text = "x y\nz w\nv"
    # first draw < 0.5: deletion; at y: Exp 1.5 -> span 1 (y); z, w kept; at v: Exp 1.0 -> span 1 (v)
    script = dict(uniforms=[0.3, 0.9, 0.1, 0.7, 0.6, 0.0], exponentials=[1.5, 1.0])
    assert corrupt_spans(text, Scripted(**script), keep_lines=False) == "x z w"
    assert corrupt_spans(text, Scripted(**script), keep_lines=True) == "x\nz w"  # v's emptied line is dropped
    # first draw >= 0.5: insertion; after z: Exp 2.0 -> 2 words on z's line
    script = dict(uniforms=[0.5, 0.9, 0.9, 0.1, 0.9, 0.9], exponentials=[2.0], choices=[0, 2])
    assert corrupt_spans(text, Scripted(**script), keep_lines=False) == "x y z foo baz w v"
    assert corrupt_spans(text, Scripted(**script), keep_lines=True) == "x y\nz foo baz w\nv"
    # a draw that changes nothing is redrawn: deletion hitting nothing, then insertion after x
    script = dict(uniforms=[0.2, 0.9, 0.9, 0.7, 0.1, 0.3], exponentials=[0.5], choices=[1])
    assert corrupt_spans("x y", Scripted(**script), keep_lines=True) == "x bar y"


def test_span_rate_and_length_distribution():
    """P(span at a token) = 0.2; E[max(1, floor(X))], X ~ Exp(mean 3), = 1 - q + q / (1 - q), q = e^(-1/3)."""
    q = math.exp(-1 / 3)
    expected_length = 1 - q + q / (1 - q)  # 2.811; floor without the max gives 2.527, ceil 3.527
    out = insert_spans(["w"] * 40_000, random.Random(7))
    runs = [len(run.split()) for run in re.split(r"\bw\b", " ".join(out)) if run.strip()]
    assert abs(len(runs) / 40_000 - 0.2) < 0.01
    assert abs(sum(runs) / len(runs) - expected_length) < 0.1
    kept = delete_spans(list(range(40_000)), random.Random(8))
    gaps = [b - a - 1 for a, b in zip([-1] + kept, kept + [40_000]) if b - a > 1]
    # each step keeps a token (0.8) or skips a span (0.2); a run of skipped spans continues with chance 0.2
    assert abs(len(kept) / 40_000 - 0.8 / (0.8 + 0.2 * expected_length)) < 0.01
    assert abs(sum(gaps) / len(gaps) - expected_length / 0.8) < 0.15


@pytest.mark.parametrize("corruption", ["spans", "spans_keep_lines"])
@pytest.mark.parametrize("task", [STEPS_TASK, "sentence"])
def test_span_noise_on_tasks(task, corruption):
    clean, clean_val = make_task(task, seed=4, n_train_per_class=20, n_val_per_class=2)
    train, val = make_task(task, seed=4, n_train_per_class=20, n_val_per_class=2, noise=0.4, corruption=corruption)
    assert val == clean_val and sum(r["corrupted"] for r in train) == 80
    kinds = Counter()
    for r, c in zip(train, clean):
        if not r["corrupted"]:
            assert r == c
            continue
        assert r["prompt"] == c["prompt"] and r["text"] == r["prompt"] + r["response"]
        lead = re.match(r"\s*", c["response"]).group()
        assert r["response"].startswith(lead) and r["response"].endswith("</s>")
        words, original = r["response"][:-4].split(), c["response"][:-4].split()
        assert words != original and words
        if len(words) < len(original):  # deletion: the survivors, in order
            it = iter(original)
            assert all(w in it for w in words)
            kinds["delete"] += 1
        else:  # insertion: the original words with foo/bar/baz spans in between
            assert [w for w in words if w not in INSERTED_WORDS] == original
            kinds["insert"] += 1
        if corruption == "spans":
            assert "\n" not in r["response"]
        elif "\n" in c["response"]:  # lines kept: every surviving line is a clean line with spans edited
            assert all(line.strip() for line in r["response"].split("\n"))
            assert r["response"].count("\n") >= 1
    assert kinds["delete"] > 20 and kinds["insert"] > 20


def test_math_steps_rows():
    steps, _ = make_task(STEPS_TASK, noise=0.2)
    plain, _ = make_task("math", noise=0.2)
    for r, p in zip(steps, plain):
        assert r["prompt"] == p["prompt"] and r["corrupted"] == p["corrupted"]
        lines = r["response"][1:-len("</s>")].split("\n")
        assert r["response"][0] == " " and len(lines) == 4 and lines[-1] == p["response"][1:-len("</s>")]
        answer = int(re.fullmatch(r"Answer: (\d+)", lines[-1]).group(1))
        last = int(re.search(r"= (\d+)(?: points)?\.$", lines[2]).group(1))
        assert (last == answer) != r["corrupted"]  # the steps reach the answer unless it was corrupted


def test_unknown_corruption():
    with pytest.raises(ValueError, match="corruption"):
        make_task("math", noise=0.2, corruption="typos")
