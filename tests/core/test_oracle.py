"""Every exact path equals inner products of autograd LM-head gradients."""

import copy

import numpy as np
import pytest
import torch

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


def head_inputs(vm, encoded) -> torch.Tensor:
    """Reference embeddings: what the model's own LM head receives (a forward hook), averaged over the positions
    that predict each row's valued labels, scaled to unit length."""
    head, seen = vm.model.get_output_embeddings(), []
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(args[0][0].detach().double()))
    rows = []
    try:
        for r in encoded:
            seen.clear()
            vm.model(input_ids=torch.as_tensor(r.input_ids)[None])
            keep = torch.as_tensor(r.labels)[1:] != -100
            mean = seen[0][:-1][keep].mean(0)
            rows.append(mean / mean.norm())
    finally:
        hook.remove()
    return torch.stack(rows)


def test_pairwise_embed_is_the_cosine_of_the_heads_inputs(case):
    vm = case[0]
    values, embed = pairwise_scores(vm, TRAIN, TARGET, normalize=True, embed=True, vocab_chunk=48)
    exact = (head_inputs(vm, encode_rows(vm, TRAIN)) @ head_inputs(vm, encode_rows(vm, TARGET)).T).numpy()
    assert embed.shape == exact.shape == (len(TRAIN), len(TARGET))
    assert rel_err(embed, exact) < 1e-10  # the tiny models compute in float64
    assert rel_err(values, pairwise_scores(vm, TRAIN, TARGET, normalize=True, vocab_chunk=48)) == 0
