"""Every exact path equals inner products of autograd LM-head gradients."""

import copy

import numpy as np
import pytest

from forvalue_ray import encode_rows, from_hf, group_scores, pairwise_scores, value_scores
from forvalue_ray.testing.tiny import CONFIGS, oracle_gradients, tiny_model

TRAIN = [{"text": "the cat sat on the mat"}, {"prompt": "Q: 2+2?", "response": " A: 4"},
         {"text": "zebra!"}, {"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello there"},
                                           {"role": "user", "content": "and?"},
                                           {"role": "assistant", "content": "bye"}]},
         {"input_ids": [1, 20, 21, 22, 23, 24], "labels": [-100, -100, 21, -100, 23, 24]}]
TARGET = [{"text": "a cat on a mat"}, {"prompt": "Q: 3+3?", "response": " A: 6"},
          {"text": "zebras and cats"}, {"text": "no"}]
GROUPS = ["animals", "math", "animals", "short"]


def rel_err(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b))


@pytest.fixture(params=[(f, bias) for f in CONFIGS for bias in (False, True) if not (bias and f == "gemma2")],
                ids=lambda p: p[0] + ("+bias" if p[1] else ""))
def case(request):
    family, bias = request.param
    vm = tiny_model(family, head_bias=bias)
    g_train = oracle_gradients(vm, encode_rows(vm, TRAIN))
    g_target = oracle_gradients(vm, encode_rows(vm, TARGET))
    return vm, g_train, g_target


@pytest.mark.parametrize("normalize", [False, True])
def test_pairwise_and_mean_match_autograd(case, normalize):
    vm, gt, gs = case
    if normalize:
        gt, gs = gt / gt.norm(dim=1, keepdim=True), gs / gs.norm(dim=1, keepdim=True)
    exact = (gt @ gs.T).numpy()
    pw = pairwise_scores(vm, TRAIN, TARGET, normalize=normalize, vocab_chunk=48)
    assert rel_err(pw, exact) < 1e-5
    mean = value_scores(vm, TRAIN, TARGET, normalize=normalize, vocab_chunk=48)
    assert rel_err(mean, exact.mean(1)) < 1e-5


def test_groups_match_autograd(case):
    vm, gt, gs = case
    names, scores = group_scores(vm, TRAIN, TARGET, GROUPS, vocab_chunk=37)
    assert names == ["animals", "math", "short"]
    for k, name in enumerate(names):
        members = [j for j, g in enumerate(GROUPS) if g == name]
        assert rel_err(scores[:, k], (gt @ gs[members].T).mean(1).numpy()) < 1e-5


def test_fp32_model_matches_fp64_oracle():
    vm64 = tiny_model("gemma2")
    vm32 = from_hf(copy.deepcopy(vm64.model).float(), vm64.tokenizer)
    gt = oracle_gradients(vm64, encode_rows(vm64, TRAIN))
    gs = oracle_gradients(vm64, encode_rows(vm64, TARGET))
    assert rel_err(value_scores(vm32, TRAIN, TARGET), (gt @ gs.T).mean(1).numpy()) < 1e-4
