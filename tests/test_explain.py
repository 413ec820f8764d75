"""``token_contributions`` and ``forvalue-ray explain``: a row's score split into one term per token.

Each token's term is checked against the autograd oracle token by token (the LM-head gradient of that token's
log-likelihood alone, inner product with the target side), and the terms of a row sum to the score that
``score_against`` / ``pairwise_scores`` give, in every mode: mean (dense and factored statistics), groups, cosine,
centered, pairwise (plain and cosine)."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

import forvalue_ray as fv
from forvalue_ray.encode import IGNORE
from tiny import oracle_gradients, tiny_model

TRAIN = [{"text": "the cat sat on the mat"}, {"prompt": "Q: 2+2?", "response": " A: 4"},
         {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                       {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]},
         {"input_ids": [1, 20, 21, 22, 23, 24], "labels": [-100, -100, 21, -100, 23, 24]}]
TARGET = [{"text": "a cat on a mat"}, {"prompt": "Q: 3+3?", "response": " A: 6"}, {"text": "zebras and cats"}]
GROUPS = ["animals", "math", "animals"]
SAMPLE = [{"text": "some other row"}, {"prompt": "Q: 1+1?", "response": " A: 2"}]


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture(scope="module")
def vm():
    return tiny_model("gemma2", head_bias=False)  # soft-capping and tied embeddings: the hardest head


@pytest.fixture(scope="module")
def oracle(vm):
    """Autograd: per training row, each valued token's own LM-head gradient [T_i, P] (zero rows elsewhere); per
    target row and per centering row, its whole gradient."""
    encoded = fv.encode_rows(vm, TRAIN)
    per_token = []
    for r in encoded:
        g = torch.zeros(len(r.input_ids), oracle_gradients(vm, [r]).shape[1], dtype=torch.float64)
        for j in np.flatnonzero(r.labels != IGNORE):
            if j == 0:
                continue
            labels = np.full_like(r.labels, IGNORE)
            labels[j] = r.labels[j]
            g[j] = oracle_gradients(vm, [replace(r, labels=labels)])[0]
        per_token.append(g)
    return {"tokens": per_token, "target": oracle_gradients(vm, fv.encode_rows(vm, TARGET)),
            "sample": oracle_gradients(vm, fv.encode_rows(vm, SAMPLE))}


# fp64 model: dense target statistics are kept in float32 (as the job saves them), so a term differs from the fp64
# oracle by float32 rounding of Ḡ; the sum of the terms and the API's score are the same fp64 numbers summed in
# another order
ORACLE_TOL, SUM_TOL = 1e-6, 1e-10


def check(res, expected_per_token, scores, tol=ORACLE_TOL):
    """Every token's term equals the oracle's, the terms sum to the row's score from the existing API."""
    for i, (c, exp) in enumerate(zip(res.contributions, expected_per_token)):
        assert c.shape[0] == len(res.input_ids[i])
        assert rel_err(c, exp) < tol, (i, c, exp)
        assert not np.any(c[~res.valued[i]]), "a token that is not valued has a term"
        assert rel_err(c.sum(0), scores[i]) < SUM_TOL
    assert rel_err(res.scores, scores) < SUM_TOL


@pytest.mark.parametrize("form", ["dense", "factored"])
def test_mean_mode_terms_are_the_autograd_terms(vm, oracle, form):
    stats = fv.target_statistics(vm, TARGET, stats_form=form, vocab_chunk=48)
    res = fv.token_contributions(vm, TRAIN, stats, vocab_chunk=48)
    gbar = oracle["target"].mean(0)
    check(res, [(g @ gbar).numpy() for g in oracle["tokens"]], fv.score_against(vm, TRAIN, stats)[:, 0])
    whole = torch.stack([g.sum(0) for g in oracle["tokens"]]) @ gbar
    assert rel_err([c.sum() for c in res.contributions], whole.numpy()) < ORACLE_TOL  # = the oracle's row score
    assert res.names == ["all"]


def test_groups_all_columns_and_one_chosen(vm, oracle):
    stats = fv.target_statistics(vm, TARGET, groups=GROUPS, stats_form="dense", vocab_chunk=37)
    names, api = fv.group_scores(vm, TRAIN, TARGET, GROUPS, vocab_chunk=37)  # factored statistics, here
    scores = fv.score_against(vm, TRAIN, stats)
    assert rel_err(scores, api) < ORACLE_TOL
    gbar = torch.stack([oracle["target"][[j for j, g in enumerate(GROUPS) if g == n]].mean(0) for n in names])
    res = fv.token_contributions(vm, TRAIN, stats, vocab_chunk=37)
    assert res.names == names == ["animals", "math"]
    check(res, [(g @ gbar.T).numpy() for g in oracle["tokens"]], scores)
    one = fv.token_contributions(vm, TRAIN, stats, target="math")
    assert one.names == ["math"] and one.contributions[0].ndim == 1
    check(one, [(g @ gbar[1]).numpy() for g in oracle["tokens"]], scores[:, 1])
    with pytest.raises(ValueError, match="no target 'nope'"):
        fv.token_contributions(vm, TRAIN, stats, target="nope")


def test_cosine_terms_divide_by_the_row_norm(vm, oracle):
    stats = fv.target_statistics(vm, TARGET, normalize=True)
    gs = oracle["target"] / oracle["target"].norm(dim=1, keepdim=True)
    expected = [(g @ gs.mean(0) / g.sum(0).norm()).numpy() for g in oracle["tokens"]]
    res = fv.token_contributions(vm, TRAIN, stats)
    check(res, expected, fv.value_scores(vm, TRAIN, TARGET, normalize=True))


def test_centered_terms_subtract_the_sample_term(vm, oracle):
    mu = fv.target_statistics(vm, SAMPLE, stats_form="dense")
    stats = fv.target_statistics(vm, TARGET, center=mu)
    gbar = oracle["target"].mean(0) - oracle["sample"].mean(0)
    res = fv.token_contributions(vm, TRAIN, stats)
    check(res, [(g @ gbar).numpy() for g in oracle["tokens"]], fv.value_scores(vm, TRAIN, TARGET, center=SAMPLE))


@pytest.mark.parametrize("normalize", [False, True])
def test_pairwise_terms_against_one_target_row(vm, oracle, normalize):
    ref = fv.target_reference(vm, TARGET)
    pw = fv.pairwise_scores(vm, TRAIN, TARGET, normalize=normalize)
    gs = oracle["target"]
    if normalize:
        gs = gs / gs.norm(dim=1, keepdim=True)
    norm = (lambda g: g.sum(0).norm()) if normalize else (lambda g: 1.0)
    for j in range(len(TARGET)):
        res = fv.token_contributions(vm, TRAIN, ref, target=j, normalize=normalize)
        check(res, [(g @ gs[j] / norm(g)).numpy() for g in oracle["tokens"]], pw[:, j])
    every = fv.token_contributions(vm, TRAIN, ref, normalize=normalize)
    assert every.contributions[0].shape[1] == len(TARGET)
    assert rel_err(every.scores, pw) < SUM_TOL


def test_fp32_model_within_fp32_rounding(vm):
    vm32 = fv.from_hf(copy.deepcopy(vm.model).float(), vm.tokenizer)
    stats = fv.target_statistics(vm32, TARGET, groups=GROUPS)
    res = fv.token_contributions(vm32, TRAIN, stats)
    assert rel_err([c.sum(0) for c in res.contributions], fv.score_against(vm32, TRAIN, stats)) < 1e-5
    stats64 = fv.target_statistics(vm, TARGET, groups=GROUPS)
    res64 = fv.token_contributions(vm, TRAIN, stats64)
    for a, b in zip(res.contributions, res64.contributions):
        assert rel_err(a, b) < 1e-3


def test_hand_checkable_prompt_response_row(vm):
    """A prompt/response row: the prompt's tokens have exactly 0, every response token (and the end-of-sequence
    token) has its own term; a long row in small blocks and vocabulary chunks gives the same terms."""
    stats = fv.target_statistics(vm, TARGET)
    row = {"prompt": "Q: 2+2?", "response": " A: 4"}
    res = fv.token_contributions(vm, [row], stats)
    n_prompt = len(vm.tokenizer("Q: 2+2?")["input_ids"])  # <s> + 7 characters
    c, valued = res.contributions[0], res.valued[0]
    assert n_prompt == 8 and len(c) == n_prompt + len(" A: 4") + 1  # + </s>
    assert not valued[:n_prompt].any() and valued[n_prompt:].all()
    assert np.all(c[:n_prompt] == 0) and np.all(c[n_prompt:] != 0)
    assert res.input_ids[0][-1] == vm.tokenizer.eos_token_id
    long_row = {"prompt": "Q:", "response": " the cat sat on the mat" * 8}
    a = fv.token_contributions(vm, [long_row], stats)
    b = fv.token_contributions(vm, [long_row], stats, vocab_chunk=17, max_tokens=64)
    assert rel_err(a.contributions[0], b.contributions[0]) < 1e-10
