"""Rows → token ids and loss masks (encode.py), checked on hand-built examples with the character tokenizer.

The expected ids are built by hand from the tokenizer's vocabulary (one id per character, ``<s>`` = 1,
``</s>`` = 2), independently of the Encoder; the expected labels follow the HF convention
(``labels[j] = ids[j]`` where token j is valued, else -100).
"""

import re

import numpy as np
import pytest

from forvalue_ray import Columns, Encoded, RowError, encode_rows
from forvalue_ray.encode import IGNORE, Encoder
from forvalue_ray.testing.tiny import VOCAB, char_tokenizer

TOK = char_tokenizer()
V = TOK.get_vocab()
BOS, EOS = V["<s>"], V["</s>"]
assert (BOS, EOS) == (1, 2)


def chars(s: str) -> list[int]:
    """Ids of a plain string, one per character (no special tokens inside)."""
    return [V[c] for c in s]


def rendered(s: str) -> list[int]:
    """Ids of a rendered chat string: ``<s>`` and ``</s>`` are single special tokens, the rest characters."""
    out = []
    for piece in re.split(r"(</s>|<s>)", s):
        if piece == "<s>":
            out.append(BOS)
        elif piece == "</s>":
            out.append(EOS)
        else:
            out += chars(piece)
    return out


def enc(**kw) -> Encoder:
    kw.setdefault("vocab_size", VOCAB)
    return Encoder(TOK, **kw)


def check(e: Encoded, ids, labels):
    assert e.input_ids.dtype == np.int64 and e.labels.dtype == np.int64
    assert e.input_ids.tolist() == list(ids)
    assert e.labels.tolist() == list(labels)


def rejects(encoder, row, *words):
    with pytest.raises(RowError) as info:
        encoder(row)
    msg = str(info.value).lower()
    for w in words:
        assert w.lower() in msg, f"{w!r} not in {msg!r}"
    return msg


# ---- the four row forms --------------------------------------------------------------------------------


def test_text_row():
    e = enc()({"text": "Hi there!", "id": 7})
    ids = [BOS] + chars("Hi there!")
    check(e, ids, [IGNORE] + ids[1:])
    assert e.id == "7"
    assert e.n_valued == len("Hi there!")


def test_text_row_fallback_id():
    assert enc()({"text": "ab"}, fallback_id="row-3").id == "row-3"
    assert enc()({"text": "ab", "id": None}, fallback_id="5").id == "5"


def test_prompt_response_row_values_response_and_eos():
    e = enc()({"prompt": "Q: 2+2?", "response": " A: 4"})
    p, r = [BOS] + chars("Q: 2+2?"), chars(" A: 4") + [EOS]  # response without BOS, with the closing EOS
    check(e, p + r, [IGNORE] * len(p) + r)
    assert e.n_valued == len(r)


def test_prompt_response_eos_once_or_off():
    p = [BOS] + chars("Q")
    already = enc()({"prompt": "Q", "response": "A</s>"})  # the char tokenizer reads "</s>" as the EOS token
    check(already, p + chars("A") + [EOS], [IGNORE] * len(p) + chars("A") + [EOS])
    off = enc(response_eos=False)({"prompt": "Q", "response": "A"})
    check(off, p + chars("A"), [IGNORE] * len(p) + chars("A"))


def test_messages_row_values_assistant_content_and_closing_eos():
    msgs = [{"role": "system", "content": "be kind"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "bye"}]
    e = enc()({"messages": msgs})
    # rendered: <s>system:be kind</s><s>user:hi</s><s>assistant:hello there</s><s>user:and?</s><s>assistant:bye</s>
    segments = [("<s>system:be kind</s><s>user:hi</s><s>assistant:", False), ("hello there</s>", True),
                ("<s>user:and?</s><s>assistant:", False), ("bye</s>", True)]
    ids, labels = [], []
    for text, valued in segments:
        seg = rendered(text)
        ids += seg
        labels += seg if valued else [IGNORE] * len(seg)
    assert ids == rendered(TOK.apply_chat_template(msgs, tokenize=False))
    check(e, ids, labels)
    assert e.n_valued == len("hello there") + 1 + len("bye") + 1


def test_messages_row_from_arrow_array():
    """List columns arrive from Arrow as numpy object arrays."""
    msgs = np.array([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], dtype=object)
    e = enc()({"messages": msgs})
    ids = rendered("<s>user:q</s><s>assistant:a</s>")
    check(e, ids, [IGNORE] * (len(ids) - 2) + [V["a"], EOS])


def test_messages_extra_keys_ignored():
    msgs = [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a", "tool_calls": None}]
    e = enc()({"messages": msgs})
    assert e.input_ids.tolist() == rendered("<s>user:q</s><s>assistant:a</s>")


def test_messages_assistant_first_values_only_content():
    msgs = [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]
    e = enc()({"messages": msgs})
    head, body, tail = rendered("<s>assistant:"), rendered("yo</s>"), rendered("<s>user:hi</s>")
    check(e, head + body + tail, [IGNORE] * len(head) + body + [IGNORE] * len(tail))


def test_input_ids_with_labels_passthrough():
    row = {"input_ids": [1, 20, 21, 22, 23, 24], "labels": [-100, -100, 21, -100, 23, 24]}
    e = enc()(row)
    check(e, row["input_ids"], row["labels"])
    assert e.n_valued == 3


def test_input_ids_from_numpy_passthrough():
    e = enc()({"input_ids": np.array([1, 5, 6], dtype=np.int32), "labels": np.array([5, 5, 6])})
    check(e, [1, 5, 6], [5, 5, 6])  # labels[0] is kept as given (it is never a prediction target)
    assert e.n_valued == 2


def test_input_ids_without_labels():
    e = enc()({"input_ids": [1, 30, 31, 32]})
    check(e, [1, 30, 31, 32], [IGNORE, 30, 31, 32])


def test_input_ids_take_precedence_over_text():
    e = enc()({"input_ids": [1, 30, 31], "text": "something else"})
    check(e, [1, 30, 31], [IGNORE, 30, 31])


def test_custom_columns():
    cols = Columns(id="key", text="body", prompt="q", response="a")
    e = enc(columns=cols)({"key": "k1", "body": "xy"})
    check(e, [BOS] + chars("xy"), [IGNORE] + chars("xy"))
    assert e.id == "k1"
    e = enc(columns=cols)({"q": "1", "a": "2"})
    check(e, [BOS, V["1"], V["2"], EOS], [IGNORE, IGNORE, V["2"], EOS])


# ---- length limits ---------------------------------------------------------------------------------------


def test_truncation_at_max_length():
    e = enc(max_length=5)({"text": "abcdefgh"})
    ids = ([BOS] + chars("abcdefgh"))[:5]
    check(e, ids, [IGNORE] + ids[1:])
    e = enc(max_length=6)({"prompt": "abc", "response": "defgh"})
    check(e, [BOS] + chars("abcde"), [IGNORE] * 4 + chars("de"))
    assert e.truncated == 4  # "fgh" and the EOS
    assert enc(max_length=6)({"text": "abcde"}).truncated == 0


def test_exact_max_length_is_kept_whole():
    e = enc(max_length=4, overlong="reject")({"text": "abc"})
    assert len(e.input_ids) == 4


def test_overlong_reject():
    rejects(enc(max_length=5, overlong="reject"), {"text": "abcdefgh"}, "over-long", "9", "max_length 5")


def test_bad_overlong_setting():
    with pytest.raises(ValueError, match="overlong"):
        Encoder(TOK, overlong="drop")


def test_valued_tokens_truncated_away():
    msg = rejects(enc(max_length=6), {"prompt": "a long prompt", "response": "x"}, "no valued token")
    assert "max_length 6" in msg
    rejects(enc(max_length=4), {"messages": [{"role": "user", "content": "hello"},
                                             {"role": "assistant", "content": "x"}]}, "no valued token")


def test_nothing_valued_passthrough():
    rejects(enc(), {"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}, "no valued token")
    rejects(enc(), {"input_ids": [5], "labels": [5]}, "no valued token")  # labels[0] is never predicted


# ---- bad rows ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, words", [
    pytest.param({"text": ""}, ["'text'", "empty"], id="empty-text"),
    pytest.param({"text": "  \n "}, ["'text'", "empty"], id="whitespace-text"),
    pytest.param({"text": 123}, ["'text'", "string", "int"], id="text-int"),
    pytest.param({"prompt": "only a prompt"}, ["'prompt'", "'response'", "both"], id="prompt-only"),
    pytest.param({"response": "only a response"}, ["'prompt'", "'response'", "both"], id="response-only"),
    pytest.param({"prompt": "p", "response": ""}, ["'response'", "empty"], id="empty-response"),
    pytest.param({"id": 3, "txt": "typo"}, ["none of the columns", "text"], id="no-column"),
    pytest.param({}, ["none of the columns"], id="empty-row"),
    pytest.param({"text": None}, ["none of the columns"], id="text-none"),
    pytest.param({"input_ids": []}, ["'input_ids'", "empty"], id="empty-input-ids"),
    pytest.param({"input_ids": [1, 2, 3], "labels": [-100, 2]}, ["'labels'", "2 entries", "3"], id="labels-length"),
    pytest.param({"input_ids": [1, "x", 3]}, ["integers"], id="input-ids-str-item"),
    pytest.param({"input_ids": [1, None, 3]}, ["integers"], id="input-ids-none-item"),
    pytest.param({"input_ids": 5}, ["integers"], id="input-ids-scalar"),
    pytest.param({"input_ids": [1, 2], "labels": ["a", "b"]}, ["integers"], id="labels-str"),
    pytest.param({"input_ids": [1, 2, VOCAB]}, ["out of range", str(VOCAB)], id="id-eq-vocab"),
    pytest.param({"input_ids": [1, -3, 2]}, ["out of range"], id="id-negative"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}]}, ["no assistant turn"], id="no-assistant"),
    pytest.param({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
                 ["no assistant turn"], id="system-user-only"),
    pytest.param({"messages": "user: hi"}, ["'messages'", "list"], id="messages-str"),
    pytest.param({"messages": {"role": "assistant", "content": "x"}}, ["'messages'", "list"], id="messages-dict"),
    pytest.param({"messages": []}, ["'messages'", "non-empty list"], id="messages-empty"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, ["'content'"],
                 id="missing-content"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]},
                 ["'content'"], id="content-int"),
    pytest.param({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, ["'role'"],
                 id="missing-role"),
    pytest.param({"messages": ["hi", {"role": "assistant", "content": "x"}]}, ["'role'", "'content'"],
                 id="message-str"),
])
def test_bad_rows_raise_row_error_naming_the_problem(row, words):
    rejects(enc(), row, *words)


def test_row_error_is_a_value_error():
    assert issubclass(RowError, ValueError)


def test_vocab_check_off_without_vocab_size():
    e = Encoder(TOK)({"input_ids": [1, 2, 10_000]})
    assert e.input_ids.tolist() == [1, 2, 10_000]


@pytest.mark.parametrize("labels", [[-100, 5, VOCAB + 839], [-100, 5, -5]], ids=["too-large", "negative"])
def test_label_out_of_vocab_range_rejected(labels):
    rejects(enc(), {"input_ids": [1, 5, 6], "labels": labels}, "out of range")


@pytest.mark.parametrize("ids", [[1.5, 2.7, 3.2], "123"], ids=["floats", "digit-string"])
def test_non_integer_input_ids_rejected(ids):
    rejects(enc(), {"input_ids": ids}, "integers")


# ---- encode_rows (api.py) -----------------------------------------------------------------------------------


class _VM:
    """Just what encode_rows reads from a ValuationModel: no model needed."""

    class head:
        vocab_size = VOCAB

    tokenizer = TOK
    context_length = 256


def test_encode_rows_ids_and_passthrough():
    pre = Encoded("pre", np.array([1, 5, 6]), np.array([IGNORE, 5, 6]))
    out = encode_rows(_VM, [{"text": "ab"}, {"text": "cd", "id": "x"}, pre])
    assert [e.id for e in out] == ["0", "x", "pre"]
    assert out[2] is pre


def test_encode_rows_error_names_index_and_id():
    with pytest.raises(RowError) as info:
        encode_rows(_VM, [{"text": "ok"}, {"text": "fine"}, {"id": "abc", "text": "   "}])
    msg = str(info.value)
    assert "row 2" in msg and "'abc'" in msg and "empty" in msg
    with pytest.raises(RowError) as info:
        encode_rows(_VM, [{"text": "ok"}, {"prompt": "p"}])
    msg = str(info.value)
    assert "row 1" in msg and "'1'" in msg and "both" in msg


def test_encode_rows_checks_vocab_and_length_options():
    with pytest.raises(RowError, match="row 0.*out of range"):
        encode_rows(_VM, [{"input_ids": [1, VOCAB + 1]}])
    with pytest.raises(RowError, match="over-long"):
        encode_rows(_VM, [{"text": "abcdef"}], max_length=3, overlong="reject")
    assert len(encode_rows(_VM, [{"text": "abcdef"}], max_length=3)[0].input_ids) == 3


def test_encode_rows_empty():
    with pytest.raises(ValueError, match="no rows"):
        encode_rows(_VM, [])
