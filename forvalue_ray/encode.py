"""Rows → token ids and loss masks.

A row is a dict in one of four forms (each with an optional id):

- ``input_ids`` (+ optional ``labels``, Hugging Face convention: ``labels[j] = -100`` is not valued,
  otherwise token j is predicted from position j−1);
- ``text``: every predicted token is valued;
- ``prompt`` + ``response``: ids(prompt, with special tokens) + ids(response, without) + the tokenizer's
  end-of-sequence token (as SFT trainers append it; ``response_eos=False`` leaves it out); response and
  end-of-sequence token valued;
- ``messages``: rendered with the tokenizer's chat template; assistant turns valued.

The output keeps the HF ``labels`` convention. A row that cannot be valued raises :class:`RowError`
with a reason a user can act on; the pipeline routes it to the rejected table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100
DEFAULT_MAX_LENGTH = 2048  # when the model states no context length


class RowError(ValueError):
    """A row that cannot be valued; the message is the reason recorded in ``rejected/``."""


@dataclass(frozen=True)
class Columns:
    """The names of a row's columns (job configs take each as ``<name>_column``)."""

    id: str = "id"
    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    images: str = "images"
    input_ids: str = "input_ids"
    labels: str = "labels"


@dataclass
class Encoded:
    id: str
    input_ids: np.ndarray  # int64 [T]
    labels: np.ndarray  # int64 [T], IGNORE where not valued
    vision: dict | None = None  # processor outputs for image rows (pixel_values, image_grid_thw, …)
    truncated: int = 0  # tokens dropped at max_length

    @property
    def n_valued(self) -> int:
        return int((self.labels[1:] != IGNORE).sum())


def _present(row: dict, key: str) -> bool:
    return key in row and row[key] is not None


def _string(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"column '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"column '{key}' is empty")
    return value


def _int_list(values, name: str) -> list[int]:
    """Token ids must be integers: floats and strings are rejected, not silently converted."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise RowError(f"'{name}' must be a list of integers, got {type(values).__name__}")
    out = []
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise RowError(f"'{name}' must be a list of integers, found {t!r} ({type(t).__name__})")
        out.append(int(t))
    return out


def common_prefix_length(a: list, b: list) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])
    except Exception as e:  # tokenizers raise many types; the row, not the job, fails
        raise RowError(f"tokenizer failed: {type(e).__name__}: {e}") from e


FORMS = ("auto", "input_ids", "messages", "prompt_response", "text")


class Encoder:
    """Turns rows into :class:`Encoded` with a loss mask; ``overlong`` is ``truncate`` or ``reject``.

    ``form="auto"`` takes the first form present in the order input_ids, messages, prompt+response, text
    (a row carrying both prompt/response and text is valued on its response); name a form to force it.
    ``max_length`` is the model's context length in the API and the job (``DEFAULT_MAX_LENGTH`` here).
    """

    def __init__(self, tokenizer, *, max_length: int = DEFAULT_MAX_LENGTH, overlong: str = "truncate",
                 columns: Columns = Columns(), vocab_size: int | None = None, form: str = "auto",
                 response_eos: bool = True):
        if overlong not in ("truncate", "reject"):
            raise ValueError(f"overlong must be 'truncate' or 'reject', not {overlong!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, not {form!r}")
        self.form = form
        self.tokenizer, self.max_length, self.overlong = tokenizer, max_length, overlong
        self.columns, self.vocab_size = columns, vocab_size
        self.response_eos = response_eos

    def row_id(self, row: dict, fallback: str) -> str:
        value = row.get(self.columns.id)
        return fallback if value is None else str(value)

    def __call__(self, row: dict, fallback_id: str = "") -> Encoded:
        ids, labels = self._tokens(row)
        ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        truncated = max(0, len(ids) - self.max_length)
        if truncated:
            if self.overlong == "reject":
                raise RowError(f"over-long: {len(ids)} tokens > max_length {self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if self.vocab_size is not None and len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise RowError(f"token id out of range [0, {self.vocab_size})")
        out = Encoded(self.row_id(row, fallback_id), ids, labels, truncated=truncated)
        if out.n_valued == 0:
            where = f" within max_length {self.max_length}" if len(ids) == self.max_length else ""
            raise RowError(f"no valued token{where}")
        return out

    def _tokens(self, row: dict) -> tuple[list[int], list[int]]:
        c = self.columns
        if self.form != "auto":
            needed = {"input_ids": [c.input_ids], "messages": [c.messages], "text": [c.text],
                      "prompt_response": [c.prompt, c.response]}[self.form]
            missing = [k for k in needed if not _present(row, k)]
            if missing:
                raise RowError(f"form '{self.form}' needs column(s) {missing}")
            row = {k: row[k] for k in needed + ([c.labels] if self.form == "input_ids" and c.labels in row else [])}
        if _present(row, c.input_ids):
            return self._from_ids(row)
        if _present(row, c.messages):
            return self._from_messages(row[c.messages])
        if _present(row, c.prompt) or _present(row, c.response):
            if not (_present(row, c.prompt) and _present(row, c.response)):
                raise RowError(f"a prompt/response row needs both '{c.prompt}' and '{c.response}'")
            prompt = _ids(self.tokenizer, _string(row, c.prompt), special=True)
            response = self.with_eos(_ids(self.tokenizer, _string(row, c.response), special=False))
            return prompt + response, [IGNORE] * len(prompt) + response
        if _present(row, c.text):
            ids = _ids(self.tokenizer, _string(row, c.text), special=True)
            return ids, [IGNORE] + ids[1:]
        raise RowError(f"row has none of the columns '{c.input_ids}', '{c.messages}', "
                       f"'{c.prompt}'+'{c.response}', '{c.text}' (set them with --*-column)")

    def with_eos(self, response: list[int]) -> list[int]:
        """The response followed by the end-of-sequence token (once), unless ``response_eos`` is off."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if not self.response_eos or eos is None or (response and response[-1] == eos):
            return response
        return response + [eos]

    def _from_ids(self, row: dict) -> tuple[list[int], list[int]]:
        c = self.columns
        ids = _int_list(row[c.input_ids], c.input_ids)
        labels = _int_list(row[c.labels], c.labels) if _present(row, c.labels) else [IGNORE] + ids[1:]
        if not ids:
            raise RowError(f"column '{c.input_ids}' is empty")
        if len(labels) != len(ids):
            raise RowError(f"'{c.labels}' has {len(labels)} entries, '{c.input_ids}' {len(ids)}")
        bad = [t for t in labels if t != IGNORE and (t < 0 or (self.vocab_size is not None and t >= self.vocab_size))]
        if bad:
            raise RowError(f"label {bad[0]} out of range: must be {IGNORE} or a token id in [0, {self.vocab_size})")
        return ids, labels

    def _render(self, messages, generation_prompt: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as e:
            raise RowError(f"chat template failed: {type(e).__name__}: {e}") from e
        return _ids(self.tokenizer, text, special=False)

    def _from_messages(self, messages) -> tuple[list[int], list[int]]:
        if isinstance(messages, np.ndarray):  # list columns arrive from Arrow as arrays
            messages = list(messages)
        if not isinstance(messages, list) or not messages:
            raise RowError("column 'messages' must be a non-empty list of {role, content}")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RowError("each message needs string 'role' and 'content'")
            clean.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in clean):
            raise RowError("no assistant turn to value")
        full = self._render(clean, generation_prompt=False)
        labels = [IGNORE] * len(full)
        for i, m in enumerate(clean):
            if m["role"] != "assistant":
                continue
            end_ids = self._render(clean[: i + 1], generation_prompt=False)
            if i:
                before = self._render(clean[:i], generation_prompt=True)  # ends with the assistant header
            else:  # templates refuse an empty conversation: the header is what an empty reply shares
                empty = self._render([{"role": "assistant", "content": ""}], generation_prompt=False)
                before = end_ids[:common_prefix_length(empty, end_ids)]
            start = len(before)
            if full[: len(end_ids)] != end_ids or end_ids[:start] != before:
                raise RowError("the chat template is not prefix-stable; pass input_ids + labels instead")
            labels[start:len(end_ids)] = full[start:len(end_ids)]
        return full, labels
