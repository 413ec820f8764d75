"""The sentence-transformation task of the DataInf protocol (seeded, pure Python): the demo's corpus and the tests'.

Each of its ten classes is one transformation of a phrase (reverse the words, remove the vowels, ...), taught by a
chatbot with a made-up name; a training row is "influential" for a validation row when both share a class. With
``noise`` a fraction of the training rows is corrupted (another class's transformation: a mislabeled row);
validation rows stay clean so they can serve as the target. Two independent random streams are used, one for the
clean content and one for the corruption, so the clean rows of a noisy call are exactly the rows of the noise-free
call with the same seed. The benchmarks' other tasks and corruptions build on this module (benchmarks/tasks.py).
"""

from __future__ import annotations

import random
from typing import Callable

N_TEMPLATES = 10  # classes a task can have

# Common English words, each with at least one vowel (a, e, i, o, u) and one consonant, so that no
# transformation (e.g. "remove all vowels") empties a word and the outputs stay distinct.
WORDS = tuple("""
about above after again against air all also animal answer apple area arm art away baby back ball
bank bed bird black blue boat body book box boy bread bring brother build car card care cat chair
child city class clean clear close cloud cold color come cook corner country cup cut dance dark day
deep desk dinner dog door down draw dream drink drive duck early earth east eat egg end evening face
fall family farm fast father field find fine fire fish floor flower food foot forest friend front
fruit game garden girl give glass gold good grass green ground group hair hand happy hat head hear
heart heavy help hill hold home horse hot house idea island jump kind king kitchen lake land large
late laugh leaf learn left letter light line lion listen little long look love low make man map
market milk money moon morning mother mountain mouse music name near new night north note ocean
old open orange page paper park party pen people pencil picture place plant play point quick quiet
rain read red river road rock room round run sand school sea seat see shoe shop short sing sister
sit small snow soft song sound south star stone story street strong sun table talk tall teacher
tell tiger time today tree wall warm water west white wind window winter wood word work world write
yellow young
""".split())

VOWELS = frozenset("aeiouAEIOU")
_ONSETS = "bdfgklmnprstvz"
_NUCLEI = "aeiou"
_MAX_REDRAWS = 10_000  # consecutive duplicate draws before giving up (sizes beyond what a class can hold)


def _is_consonant(ch: str) -> bool:
    return ch.isalpha() and ch not in VOWELS


def _alternate_case(s: str) -> str:
    """Lower case at even character indices of the whole phrase (spaces included), upper at odd."""
    return "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(s))


# (title shown in the prompt, transformation); class k of the sentence task is entry k.
SENTENCE_TRANSFORMS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("reverse the order of the words", lambda s: " ".join(reversed(s.split()))),
    ("alternate lowercase and uppercase letters", _alternate_case),
    ("insert the number 1 between the words", lambda s: " 1 ".join(s.split())),
    ("replace every vowel with an asterisk", lambda s: "".join("*" if c in VOWELS else c for c in s)),
    ("double every consonant", lambda s: "".join(c * 2 if _is_consonant(c) else c for c in s)),
    ("capitalize every word", lambda s: " ".join(w[:1].upper() + w[1:] for w in s.split())),
    ("remove all vowels", lambda s: "".join(c for c in s if c not in VOWELS)),
    ("append 'ly' to every word", lambda s: " ".join(w + "ly" for w in s.split())),
    ("remove all consonants", lambda s: "".join(c for c in s if not _is_consonant(c))),
    ("repeat every word twice", lambda s: " ".join(f"{w} {w}" for w in s.split())),
)


def distinct(draw: Callable[[], object], n: int, what: str) -> list:
    """n distinct draws in draw order; duplicates would put the same item in train and validation."""
    seen, out, misses = set(), [], 0
    while len(out) < n:
        item = draw()
        if item in seen:
            misses += 1
            if misses > _MAX_REDRAWS:
                raise ValueError(f"cannot draw {n} distinct {what}")
            continue
        seen.add(item)
        out.append(item)
        misses = 0
    return out


def task_streams(family: str, seed: int, n_classes: int, n_train_per_class: int, n_val_per_class: int,
                 noise: float) -> tuple[random.Random, random.Random, set[int]]:
    """A task family's two random streams (content, corruption) and the train rows to corrupt; checks the sizes."""
    if not 1 <= n_classes <= N_TEMPLATES:
        raise ValueError(f"n_classes must be in 1..{N_TEMPLATES}, got {n_classes}")
    if n_train_per_class < 1 or n_val_per_class < 0:
        raise ValueError("need n_train_per_class >= 1 and n_val_per_class >= 0")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    rng = random.Random(f"forvalue-tasks/{family}/{seed}")
    nrng = random.Random(f"forvalue-tasks/{family}/{seed}/noise")
    n_total = n_classes * n_train_per_class
    return rng, nrng, set(nrng.sample(range(n_total), round(noise * n_total)))


def _chatbot_name(rng: random.Random) -> str:
    """A made-up name of 2–3 consonant–vowel syllables, e.g. 'Kazumo'."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) for _ in range(rng.randint(2, 3))).capitalize()


def task_row(task: str, split: str, i: int, prompt: str, response: str, cls: int, corrupted: bool) -> dict:
    """One row of a task, in the DataInf format."""
    return {"id": f"{task}-{split}-{i:05d}", "text": prompt + response, "prompt": prompt,
            "response": response, "class": cls, "corrupted": corrupted}


def _sentence_prompt(name: str, cls: int, phrase: str) -> str:
    title = SENTENCE_TRANSFORMS[cls][0]
    return (f"{name} is a chatbot that performs a specific transformation on sentences: {title}\n"
            f"    For example:\n    {phrase} ->")


def _sentence_response(transformed: str) -> str:
    """The protocol's ``"-> " + " " + transformed``: the split after "->" leaves two spaces."""
    return f"  {transformed}</s>"


def sentence_task(*, seed: int = 0, n_classes: int = 10, n_train_per_class: int = 90, n_val_per_class: int = 10,
                  noise: float = 0.0, corrupt_response: Callable[[str, random.Random], str] | None = None
                  ) -> tuple[list[dict], list[dict]]:
    """(train_rows, val_rows), class-major; ``noise`` corrupts round(noise·n_train) train rows: each gets another
    class's transformation, or, given ``corrupt_response(response, rng)``, that corruption of its own response.

    Rows carry ``id``, ``text`` (= ``prompt`` + ``response``, the DataInf format), ``prompt``, ``response``,
    ``class`` and ``corrupted``. The same arguments always give the same rows."""
    rng, nrng, corrupt = task_streams("sentence", seed, n_classes, n_train_per_class, n_val_per_class, noise)
    n_train, n_val = n_train_per_class, n_val_per_class
    names = distinct(lambda: _chatbot_name(rng), n_classes, "chatbot names")
    phrases = distinct(lambda: " ".join(rng.sample(WORDS, rng.randint(3, 5))), n_train + n_val, "phrases")
    train, val = [], []
    for cls in range(n_classes):
        for j, phrase in enumerate(phrases):
            correct = SENTENCE_TRANSFORMS[cls][1](phrase)
            i = cls * n_train + j if j < n_train else cls * n_val + j - n_train
            bad = j < n_train and i in corrupt
            out = correct
            if bad and corrupt_response is None:
                others = [fn(phrase) for k, (_, fn) in enumerate(SENTENCE_TRANSFORMS[:n_classes]) if k != cls]
                wrong = [o for o in others if o != correct]
                if not wrong:
                    raise ValueError("noise on the sentence task needs at least two classes")
                out = nrng.choice(wrong)
            response = _sentence_response(out)
            if bad and corrupt_response is not None:
                response = corrupt_response(response, nrng)
            rows = train if j < n_train else val
            rows.append(task_row("sentence", "train" if j < n_train else "val", i,
                                 _sentence_prompt(names[cls], cls, phrase), response, cls, bad))
    return train, val

