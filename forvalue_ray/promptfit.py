"""Prompt fit: does a response belong to its own prompt?

A mislabeled row (the response of another question of the same template) is a fluent, well-formed answer: every
score against the targets' mean gradient, and the row's own loss, see nothing wrong with it. What gives it away is
that its own prompt does not predict it any better than some other prompt of the same kind does. For a
prompt/response row r with prompt p and response y, and a *partner* prompt p' (the prompt of another row sharing
r's key: its task or template),

    prompt_fit(r) = NLL(y | p') − NLL(y | p)         (each: mean over y's valued tokens, in nats per token)

a pointwise mutual information between the response and its prompt, measured against a same-template prompt so
that the template's own share cancels. High: the response is specific to its prompt. Near or below 0: the prompt
tells the model nothing about this response (measured on P3 with 30% of responses swapped within their template,
SmolLM2-135M: AUC 0.9–1.0 for mislabeled rows on generation and QA tasks; at chance on classification, where the
small model cannot tell which class a text belongs to — see docs/selection.md).

Partners are the next row with the same key in the rows' order, wrapping around (a rotation: every row with a
partner lends its prompt exactly once); a row alone with its key has none, and no prompt fit; nor has a row whose
swapped version does not fit ``max_length`` whole (a cut response would be measured on other tokens than its own).
The job draws partners within each shard, the Python API within the rows it is given.

Which threshold: a mislabeled row's two prompts are both unrelated to its response, so its prompt fit is noise
around 0, as often negative as positive; a threshold of 0 keeps about half of the mislabeled rows. Rows whose
response does belong to their prompt sit well above 0, so the negative fits of a key are almost all such noise,
and by that symmetry their root mean square estimates the noise's spread on the positive side too. (Where the model
cannot tell a response from another prompt's, e.g. the classes of a review for a 135M model, every fit is noise
and this threshold drops most of the key's rows, clean ones too.) The ``auto``
threshold is that spread, per key: a row is kept when its fit is at least one noise σ above 0 (on P3 + GSM8K with
30% mislabeled, a selection for a GSM8K target held 13% mislabeled rows with it, 23% with 0, 30% at random — see
docs/selection.md). Per key, because the spread depends on the template (a one-word answer's NLL varies far more
than a long answer's mean per token).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def partners(keys: Sequence) -> list[int | None]:
    """For each row, the index of the next row with the same key (wrapping around), or None: a row alone with its
    key, or with key None."""
    by_key: dict = {}
    for i, k in enumerate(keys):
        if k is not None:
            by_key.setdefault(k, []).append(i)
    out: list[int | None] = [None] * len(keys)
    for members in by_key.values():
        if len(members) > 1:
            for a, b in zip(members, members[1:] + members[:1]):
                out[a] = b
    return out


def swapped_rows(rows: Sequence[dict], keys: Sequence, prompt_column: str = "prompt") -> list[dict | None]:
    """Each row with its partner's prompt (:func:`partners`), or None where it has no partner or no prompt."""
    out: list[dict | None] = []
    for row, j in zip(rows, partners(keys)):
        has_prompt = j is not None and row.get(prompt_column) is not None and rows[j].get(prompt_column) is not None
        out.append({**row, prompt_column: rows[j][prompt_column]} if has_prompt else None)
    return out


def whole(encoded):
    """The encoded swapped row, or None when cut at max_length."""
    return None if encoded.truncated else encoded


def prompt_fit(own_nll: np.ndarray, swapped_nll: np.ndarray) -> np.ndarray:
    """NLL under the partner's prompt minus NLL under the row's own (NaN where a row has no partner)."""
    return np.asarray(swapped_nll, dtype=np.float64) - np.asarray(own_nll, dtype=np.float64)


def null_moments(fit: np.ndarray, keys: Sequence) -> dict:
    """Per key: [count, sum of squares] of its rows' negative prompt fits. Sums, so shards' moments merge by
    addition (:func:`merge_moments`)."""
    out: dict = {}
    for f, k in zip(np.asarray(fit, dtype=np.float64), keys):
        if k is not None and f < 0:  # NaN (no partner) is not < 0
            m = out.setdefault(k, [0, 0.0])
            m[0] += 1
            m[1] += f * f
    return out


def merge_moments(into: dict, more: dict) -> dict:
    for k, (n, ss) in more.items():
        m = into.setdefault(k, [0, 0.0])
        m[0] += n
        m[1] += ss
    return into


def null_thresholds(moments: dict) -> dict:
    """key → the root mean square of the key's negative prompt fits: the ``auto`` threshold (module docstring). A
    key with no negative fit is absent: its threshold is 0."""
    return {k: float(np.sqrt(ss / n)) for k, (n, ss) in moments.items() if n}


def auto_thresholds(fit: np.ndarray, keys: Sequence) -> dict:
    """:func:`null_thresholds` of the rows' :func:`null_moments`, in one call (the in-memory path)."""
    return null_thresholds(null_moments(fit, keys))
