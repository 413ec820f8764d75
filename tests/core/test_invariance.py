"""Batch invariance: a row's score, pairwise scores, sketch, n_tokens and nll depend on that row
only — not on its batch mates, their lengths, the padding side, the token budget per batch or the row order."""

import copy

import numpy as np
import pytest
import torch

from forvalue_ray import (diagnostics, encode_rows, from_hf, pairwise_scores, score_against, sketches,
                          target_statistics, value_scores)
from forvalue_ray.engine import Scorer, build_reference, finish_target_stats, plan_batches, target_partial
from forvalue_ray.encode import Encoder
from forvalue_ray.testing.tiny import char_tokenizer, tiny_model

# tiny models: one thread is fastest, and far faster when the 2 cores are shared (spinning OpenMP threads)

TRAIN = [
    {"id": "focus", "text": "the quick brown fox"},
    {"text": "a"},  # one valued token
    {"prompt": "Q: what is 12*3?", "response": " A: 36, I think."},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                  {"role": "user", "content": "more?"}, {"role": "assistant", "content": "no"}]},
    # labels[0] is set: it must never be valued (no predecessor), whatever the padding side
    {"input_ids": [1, 20, 21, 22, 23, 24, 25, 26], "labels": [20, -100, 21, 22, -100, 24, 25, 26]},
    {"text": "a much longer row of plain text that pads everyone else by quite a lot"},
    {"text": "mid length row 42"},
]
TARGET = [{"text": "a brown fox"}, {"prompt": "Q: 2*3?", "response": " A: 6"}, {"text": "zebras"}]

BIG = 4096
SMALL = 80  # padded tokens per forward: forces 4 batches for TRAIN (lengths 2..71), the first one padded
SETTINGS = [("right", BIG), ("left", BIG), ("right", SMALL), ("left", SMALL), ("left", 1)]
SKETCH_DIM = 64

# (family, dtype, attention); fp64 + eager + left padding once gave NaN (test_left_padding_fp64_eager below).
MODELS = {"llama-fp64": ("llama", torch.float64, "sdpa"), "qwen2-fp64": ("qwen2", torch.float64, "sdpa"),
          "gemma2-fp64": ("gemma2", torch.float64, "eager"), "llama-fp32": ("llama", torch.float32, "eager"),
          "gemma2-fp32": ("gemma2", torch.float32, "eager")}


def tol(vm):
    return 1e-6 if vm.dtype == torch.float64 else 1e-4


def assert_close(a, b, rel, what=""):
    """Max abs difference within rel × the largest magnitude (per array)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, what
    scale = max(np.max(np.abs(b)), 1e-30)
    err = np.max(np.abs(a - b)) / scale
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel:g}"


def make_vm(name):
    family, dtype, attn = MODELS[name]
    vm = tiny_model(family)
    if dtype != torch.float64:
        vm = from_hf(copy.deepcopy(vm.model).to(dtype), vm.tokenizer)
    if attn != "eager":
        vm.model.set_attn_implementation(attn)
    return vm


class Case:
    def __init__(self, name):
        self.vm = vm = make_vm(name)
        self.rows = encode_rows(vm, TRAIN)
        self.target = encode_rows(vm, TARGET)
        self.stats = target_statistics(vm, TARGET)
        self.stats_cos = target_statistics(vm, TARGET, normalize=True)
        self.reference = build_reference(vm, self.target)
        # every row scored on its own: the ground truth for every batched setting
        self.alone = [self.score([r]) for r in self.rows]

    def scorer(self, padding_side="right", max_tokens=BIG, **kw):
        kw = {"stats": self.stats, "reference": self.reference, "sketch_dim": SKETCH_DIM, "sketch_seed": 11, **kw}
        return Scorer(self.vm, padding_side=padding_side, max_tokens=max_tokens, **kw)

    def score(self, rows, padding_side="right", max_tokens=BIG):
        return self.scorer(padding_side, max_tokens)(rows)

    def alone_stacked(self, key, order=None):
        order = range(len(self.rows)) if order is None else order
        return np.concatenate([self.alone[i][key] for i in order])


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    return Case(request.param)


def test_settings_force_several_batches():
    lengths = [len(Encoder(char_tokenizer())(r).input_ids) for r in TRAIN]
    assert len(set(lengths)) == len(lengths)  # all lengths differ: real padding in every batch
    assert max(lengths) * 2 > SMALL >= max(lengths)
    assert len(list(plan_batches(lengths, SMALL))) >= 3
    assert len(list(plan_batches(lengths, 1))) == len(lengths)
    assert len(list(plan_batches(lengths, BIG))) == 1


@pytest.mark.parametrize("padding_side, max_tokens", SETTINGS)
def test_batch_of_seven_equals_rows_alone(case, padding_side, max_tokens):
    out = case.score(case.rows, padding_side, max_tokens)
    rel = tol(case.vm)
    np.testing.assert_array_equal(out["n_tokens"], case.alone_stacked("n_tokens"))
    assert_close(out["nll"], case.alone_stacked("nll"), rel, "nll")
    assert_close(out["scores"], case.alone_stacked("scores"), rel, "mean scores")
    assert_close(out["pairwise"], case.alone_stacked("pairwise"), rel, "pairwise")
    assert_close(out["sketch"], case.alone_stacked("sketch"), rel, "sketch")
    for i in range(len(case.rows)):  # row by row, so a small row is not hidden by a large one
        assert_close(out["scores"][i], case.alone[i]["scores"][0], rel, f"score row {i}")
        assert_close(out["pairwise"][i], case.alone[i]["pairwise"][0], rel, f"pairwise row {i}")
        assert_close(out["sketch"][i], case.alone[i]["sketch"][0], rel, f"sketch row {i}")


def test_row_order_and_duplicates(case):
    order = [5, 0, 3, 0, 6, 1, 4, 2]
    out = case.score([case.rows[i] for i in order], "left", SMALL)
    rel = tol(case.vm)
    for key in ("nll", "scores", "pairwise", "sketch"):
        assert_close(out[key], case.alone_stacked(key, order), rel, key)
    np.testing.assert_array_equal(out["n_tokens"], case.alone_stacked("n_tokens", order))


def test_focus_row_sketch_identical_across_batch_mates(case):
    """The same row, alone, with a long batch mate, or among all seven: the same sketch."""
    focus = case.rows[0]
    sk = [case.score([focus], "right")["sketch"][0],
          case.score([case.rows[5], focus], "left")["sketch"][1],
          case.score([case.rows[5], focus], "right")["sketch"][1],
          case.score(case.rows[::-1], "left", SMALL)["sketch"][-1]]
    if case.vm.dtype == torch.float64:  # fp64 math, fp32 output: equal up to the final rounding
        for s in sk[1:]:
            np.testing.assert_allclose(s, sk[0], rtol=1e-6, atol=1e-6 * np.abs(sk[0]).max())
    else:
        for s in sk[1:]:
            assert_close(s, sk[0], 1e-4)
    assert np.abs(sk[0]).max() > 0


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
def test_score_against_invariant(case, normalize):
    stats = case.stats_cos if normalize else case.stats
    rel = tol(case.vm)
    alone = np.concatenate([score_against(case.vm, [r], stats) for r in TRAIN])
    for side, max_tokens in [("right", BIG), ("left", SMALL), ("left", 1)]:
        got = score_against(case.vm, TRAIN, stats, padding_side=side, max_tokens=max_tokens)
        assert_close(got, alone, rel, f"score_against {side} {max_tokens}")
    assert_close(value_scores(case.vm, TRAIN, TARGET, normalize=normalize), alone[:, 0], rel, "value_scores")
    assert_close(value_scores(case.vm, TRAIN[:1], TARGET, normalize=normalize), alone[:1, 0], rel,
                 "value_scores alone")


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
def test_pairwise_invariant(case, normalize):
    rel = tol(case.vm)
    ref = case.reference
    alone = np.concatenate([Scorer(case.vm, reference=ref, normalize=normalize)([r])["pairwise"]
                            for r in case.rows])
    for side, max_tokens in SETTINGS:
        got = Scorer(case.vm, reference=ref, normalize=normalize, padding_side=side, max_tokens=max_tokens)(case.rows)
        assert_close(got["pairwise"], alone, rel, f"pairwise {side} {max_tokens}")
    assert_close(pairwise_scores(case.vm, TRAIN, TARGET, normalize=normalize), alone, rel, "pairwise_scores")
    # the first target column alone is the same as in the full reference
    got = pairwise_scores(case.vm, TRAIN, TARGET[:1], normalize=normalize)
    assert_close(got[:, 0], alone[:, 0], rel, "one-target reference")


def test_sketches_api_invariant(case):
    rel = tol(case.vm)
    full = sketches(case.vm, TRAIN, dim=SKETCH_DIM, seed=11)
    assert_close(full, case.alone_stacked("sketch"), rel, "sketches()")
    for i in (0, 1, 4):
        assert_close(sketches(case.vm, [TRAIN[i]], dim=SKETCH_DIM, seed=11)[0], full[i], rel, f"row {i}")


def test_outputs_independent_of_other_outputs(case):
    """Asking for scores, pairwise and sketches together gives what each gives alone."""
    rel = tol(case.vm)
    both = case.score(case.rows, "left", SMALL)
    assert_close(Scorer(case.vm, stats=case.stats)(case.rows)["scores"], both["scores"], rel, "scores")
    assert_close(Scorer(case.vm, reference=case.reference)(case.rows)["pairwise"], both["pairwise"], rel, "pw")
    assert_close(Scorer(case.vm, sketch_dim=SKETCH_DIM, sketch_seed=11)(case.rows)["sketch"], both["sketch"], rel, "sk")


def test_target_side_invariant(case):
    """Target statistics and the reference do not depend on how the target rows were batched."""
    rel = tol(case.vm)
    rows = case.target + case.rows  # more target rows, many lengths
    total, counts = target_partial(case.vm, rows, [0] * len(rows), 1)
    small, _ = target_partial(case.vm, rows, [0] * len(rows), 1, max_tokens=SMALL)
    one, _ = target_partial(case.vm, rows, [0] * len(rows), 1, max_tokens=1)
    parts = sum(target_partial(case.vm, [r], [0], 1)[0] for r in rows)  # one worker per row, summed
    for other, what in ((small, "small"), (one, "one"), (parts, "per-row partials")):
        assert_close(other.double().numpy(), total.double().numpy(), rel, what)
    stats = finish_target_stats(total, counts, ["all"], False)
    stats_small = finish_target_stats(small, counts, ["all"], False)
    assert_close(score_against(case.vm, TRAIN, stats_small), score_against(case.vm, TRAIN, stats), rel, "scores")

    ref_small = build_reference(case.vm, case.target, max_tokens=1)
    got = Scorer(case.vm, reference=ref_small)(case.rows)["pairwise"]
    assert_close(got, case.alone_stacked("pairwise"), rel, "reference batched one by one")
    np.testing.assert_allclose(ref_small.sq_norms.numpy(), case.reference.sq_norms.numpy(), rtol=rel)


def test_diagnostics_invariant_and_exact(case):
    """n_tokens = number of valued labels; nll = mean over valued positions of −log_softmax(model logits)[y]."""
    vm = case.vm
    d = diagnostics(vm, TRAIN)
    expected_n, expected_nll = [], []
    with torch.no_grad():
        for r in case.rows:
            ids = torch.as_tensor(r.input_ids)[None]
            logits = vm.model(input_ids=ids).logits[0].double()  # the model's own full logits
            logp = torch.log_softmax(logits[:-1], -1)
            labels = torch.as_tensor(r.labels[1:])
            keep = labels != -100
            expected_n.append(int(keep.sum()))
            expected_nll.append(float(-logp[keep].gather(1, labels[keep][:, None]).mean()))
    assert [int(x) for x in d["n_tokens"]] == expected_n
    # by hand: text → every char; prompt/response → response chars + </s>; messages → assistant chars + each
    # </s>; passthrough → labels[1:] not -100 (labels[0] is set but has no predecessor)
    assert expected_n == [len("the quick brown fox"), 1, len(" A: 36, I think.") + 1,
                          len("hello there") + 1 + len("no") + 1, 5, len(TRAIN[5]["text"]), len("mid length row 42")]
    np.testing.assert_allclose(d["nll"], expected_nll, rtol=tol(vm))
    for i, row in enumerate(TRAIN):  # alone and batched the same
        di = diagnostics(vm, [row])
        assert int(di["n_tokens"][0]) == expected_n[i]
        np.testing.assert_allclose(di["nll"][0], expected_nll[i], rtol=tol(vm))
    for side, max_tokens in SETTINGS:
        out = Scorer(vm, padding_side=side, max_tokens=max_tokens)(case.rows)
        assert out.keys() == {"n_tokens", "nll"}
        np.testing.assert_array_equal(out["n_tokens"], expected_n)
        np.testing.assert_allclose(out["nll"], expected_nll, rtol=tol(vm))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_left_padding_fp64_eager(family):
    """transformers' eager attention adds finfo(float64).min for masked keys and took its softmax in float32, where
    that is -inf: leading pad positions got NaN and spread it to the real tokens. fp64 models now compute in fp64
    end to end, so a left-padded batch equals each row alone."""
    vm = tiny_model(family)  # float64, eager attention
    rows = encode_rows(vm, TRAIN[:2])
    alone = np.concatenate([Scorer(vm)([r])["nll"] for r in rows])
    got = Scorer(vm, padding_side="left")(rows)["nll"]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, alone, rtol=1e-10)
