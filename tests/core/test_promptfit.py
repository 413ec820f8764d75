"""Prompt fit: the partner rule by hand, and the API's values against the model's own loss computed by hand (token
ids built from the tokenizer, cross-entropy from the HF forward's logits) in float64."""

import numpy as np
import pytest
import torch

from forvalue_ray import prompt_fit
from forvalue_ray.promptfit import (auto_thresholds, merge_moments, null_moments, null_thresholds, partners,
                                    swapped_rows)
from forvalue_ray.testing.tiny import tiny_model

ROWS = [{"prompt": "Q: 2+2?", "response": " A: 4", "task": "math"},
        {"prompt": "Name a cat.", "response": " Tom", "task": "names"},
        {"prompt": "Q: 3+5?", "response": " A: 8", "task": "math"},
        {"prompt": "Say hi.", "response": " hi", "task": None},
        {"prompt": "Q: 9-1?", "response": " A: 8", "task": "math"},
        {"prompt": "Name a dog.", "response": " Rex", "task": "names"}]
KEYS = [r["task"] for r in ROWS]


def test_partners_rotate_within_a_key():
    assert partners(KEYS) == [2, 5, 4, None, 0, 1]
    assert partners(["a", "b", None]) == [None, None, None]
    swapped = swapped_rows(ROWS, KEYS)
    assert swapped[0] == {**ROWS[0], "prompt": "Q: 3+5?"} and swapped[4]["prompt"] == "Q: 2+2?"
    assert swapped[3] is None
    assert [r["response"] for r in swapped if r] == [r["response"] for r, k in zip(ROWS, KEYS) if k]


def _response_nll(vm, prompt: str, response: str) -> float:
    """Mean NLL of the response tokens and the end-of-sequence token after the prompt, by hand."""
    tok = vm.tokenizer
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = vm.model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[len(p) - 1:-1], dim=-1)
    return float(-logp[torch.arange(len(r)), torch.tensor(r)].mean())


def test_prompt_fit_is_the_loss_under_the_partner_prompt_minus_the_own():
    vm = tiny_model("llama")  # float64
    got = prompt_fit(vm, ROWS, KEYS)
    want = np.full(len(ROWS), np.nan)
    for i, j in enumerate(partners(KEYS)):
        if j is not None:
            want[i] = (_response_nll(vm, ROWS[j]["prompt"], ROWS[i]["response"])
                       - _response_nll(vm, ROWS[i]["prompt"], ROWS[i]["response"]))
    assert np.isnan(got[3]) and np.isnan(want[3])
    ok = ~np.isnan(want)
    assert np.abs(want[ok]).min() > 1e-6  # the test can see a difference
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-10, atol=1e-12)


def test_a_swapped_row_cut_at_max_length_has_no_prompt_fit():
    """Row 0 borrows row 1's long prompt: cut at max_length, it would be measured on fewer response tokens than
    its own, so it gets none; row 1 (borrowing the short prompt) keeps its value."""
    vm = tiny_model("llama")
    rows = [{"prompt": "Q: 1?", "response": " A: 1 and more", "task": "t"},
            {"prompt": "Q: " + "very long " * 4 + "?", "response": " A: 2", "task": "t"}]
    max_length = len(vm.tokenizer(rows[1]["prompt"])["input_ids"]) + 7  # row 1 itself fits whole
    fit = prompt_fit(vm, rows, ["t", "t"], max_length=max_length)
    assert np.isnan(fit[0])
    want = _response_nll(vm, rows[0]["prompt"], rows[1]["response"]) - _response_nll(vm, rows[1]["prompt"],
                                                                                     rows[1]["response"])
    assert fit[1] == pytest.approx(want, rel=1e-10)


def test_auto_threshold_is_the_root_mean_square_of_each_keys_negative_fits():
    """By hand: key a's negative fits are -0.3 and -0.4 (RMS sqrt((0.09 + 0.16) / 2)); key b has none (absent:
    threshold 0); NaN (no partner) and a None key count for nothing."""
    fit = np.array([-0.3, 2.0, -0.4, 0.5, np.nan, -9.0, 0.1])
    keys = ["a", "a", "a", "b", "a", None, "b"]
    assert null_moments(fit, keys) == {"a": [2, pytest.approx(0.25)]}
    assert auto_thresholds(fit, keys) == {"a": pytest.approx(np.sqrt(0.125))}
    halves = merge_moments(null_moments(fit[:1], keys[:1]), null_moments(fit[1:], keys[1:]))  # both hold a's
    assert null_thresholds(halves) == auto_thresholds(fit, keys)
