"""Target statistics in both exact forms: factored (Ḡ = A Bᵀ from the target's valued tokens) equals dense equals
the autograd oracle; the form survives the artifact; 16-bit models run the readout's large products in their
own dtype."""

import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from forvalue_ray import encode_rows, from_hf, pairwise_scores, score_against, target_statistics
from forvalue_ray.artifacts import load_target_stats, save_target_stats
from forvalue_ray.engine import Scorer, build_reference, finish_target_stats, target_form, target_partial
from forvalue_ray.testing.tiny import VOCAB, oracle_gradients, tiny_model

TRAIN = [{"text": "the cat sat on the mat"}, {"prompt": "Q: 2+2?", "response": " A: 4"}, {"text": "zebra!"},
         {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
TARGET = [{"text": "a cat on a mat"}, {"prompt": "Q: 3+3?", "response": " A: 6"}, {"text": "zebras and cats"},
          {"text": "no"}, {"text": "the mat is red"}]
GROUPS = ["animals", "math", "animals", "short", "animals"]


def rel_err(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b))


@pytest.fixture(scope="module", params=[("llama", False), ("gemma2", False), ("granite", True)],
                ids=["llama", "gemma2-softcap", "granite+bias"])
def case(request):
    family, bias = request.param
    vm = tiny_model(family, head_bias=bias)
    return vm, oracle_gradients(vm, encode_rows(vm, TRAIN)), oracle_gradients(vm, encode_rows(vm, TARGET))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_factored_equals_dense_equals_autograd(case, normalize, grouped):
    vm, gt, gs = case
    if normalize:
        gt, gs = gt / gt.norm(dim=1, keepdim=True), gs / gs.norm(dim=1, keepdim=True)
    groups = GROUPS if grouped else None
    names = sorted(set(GROUPS)) if grouped else ["all"]
    members = [[j for j, g in enumerate(GROUPS) if g == n] if grouped else list(range(len(TARGET))) for n in names]
    exact = np.stack([(gt @ gs[m].T).mean(1).numpy() for m in members], axis=1)
    scores = {}
    for form in ("dense", "factored"):
        stats = target_statistics(vm, TARGET, groups=groups, normalize=normalize, vocab_chunk=48, stats_form=form)
        assert stats.form == form and stats.names == names
        scores[form] = score_against(vm, TRAIN, stats, vocab_chunk=37)
        assert rel_err(scores[form], exact) < 1e-12, form  # fp64 model: fp64 end to end
    assert rel_err(scores["factored"], scores["dense"]) < 1e-12


def test_factored_partials_concatenate(case):
    """Per-row factored partials, added, give the whole set's statistics; scores unchanged."""
    vm, _, _ = case
    rows, train = encode_rows(vm, TARGET), encode_rows(vm, TRAIN)
    index = [sorted(set(GROUPS)).index(g) for g in GROUPS]
    whole, counts = target_partial(vm, rows, index, 3, stats_form="factored")
    parts = [target_partial(vm, [r], [i], 3, stats_form="factored")[0] for r, i in zip(rows, index)]
    joined = parts[0]
    for p in parts[1:]:
        joined = joined + p
    assert len(joined.weights) == len(whole.weights) == sum(r.n_valued for r in rows)
    a, b = (Scorer(vm, stats=finish_target_stats(t, counts, sorted(set(GROUPS)), False))(train)["scores"]
            for t in (whole, joined))
    assert rel_err(a, b) < 1e-12


def test_form_chosen_by_cost():
    """Factored exactly when S·(V + d) < K·V·d; the API picks it by that rule."""
    assert target_form(90, 1, 1000, 100) == "factored" and target_form(91, 1, 1000, 100) == "dense"
    assert target_form(727, 8, 1000, 100) == "factored" and target_form(728, 8, 1000, 100) == "dense"
    vm = tiny_model("llama")
    v, d = vm.head.weight.shape
    n_tokens = sum(r.n_valued for r in encode_rows(vm, TARGET))
    one, many = (target_statistics(vm, TARGET, groups=g) for g in (None, GROUPS))
    assert one.form == ("factored" if n_tokens * (v + d) < v * d else "dense")
    assert many.form == ("factored" if n_tokens * (v + d) < 3 * v * d else "dense")
    assert {one.form, many.form} == {"dense", "factored"}  # this target set sits between the two


@pytest.mark.parametrize("form", ["dense", "factored"])
def test_artifact_round_trip(tmp_path, form):
    vm = tiny_model("qwen2")
    stats = target_statistics(vm, TARGET, groups=GROUPS, normalize=True, stats_form=form)
    save_target_stats(stats, str(tmp_path))
    back = load_target_stats(str(tmp_path))
    assert back.form == form and back.names == stats.names and back.counts == stats.counts
    a, b = (score_against(vm, TRAIN, s) for s in (stats, back))
    assert rel_err(b, a) < 1e-12


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtype and contraction size of every 2-D matrix product."""

    def __init__(self):
        super().__init__()
        self.products = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            a = args[-2]
            self.products.append((a.dtype, a.shape[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_model_products_in_model_dtype(dtype):
    """Target statistics (dense and factored), the value pass against them and the pairwise pass run every
    matrix product in the model's dtype (tensor cores on a GPU); results stay close to the float64 model's."""
    vm64 = tiny_model("llama")
    vm = from_hf(copy.deepcopy(vm64.model).to(dtype), vm64.tokenizer)
    train, target = encode_rows(vm, TRAIN), encode_rows(vm, TARGET)
    reference = build_reference(vm, target)
    with MatmulDtypes() as rec:
        got = {form: Scorer(vm, stats=target_statistics(vm, target, stats_form=form))(train)["scores"][:, 0]
               for form in ("dense", "factored")}
        got["pairwise"] = Scorer(vm, reference=reference)(train)["pairwise"]
    assert (dtype, VOCAB) in rec.products  # e α'ᵀ over the whole vocabulary (one chunk here) was recorded
    assert {dt for dt, _ in rec.products} == {dtype}
    want = {form: Scorer(vm64, stats=target_statistics(vm64, target, stats_form=form))(train)["scores"][:, 0]
            for form in ("dense", "factored")}
    want["pairwise"] = pairwise_scores(vm64, train, target)
    for k in got:
        assert rel_err(got[k], want[k]) < 0.1, k


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_job_keeps_and_reuses_factored_statistics(tmp_path):
    """A target set of a few tokens: the job's target pass keeps factored statistics (run.json and the artifact
    say so), its scores equal the core API's dense ones, and --target-stats reuses the factored artifact."""
    import json

    import forvalue_ray
    from forvalue_ray.sample_data import sentence_task
    from jobtools import as_matrix, local_ray, read_scores, run_ok, save_tiny_model, write_parquet

    train, _ = sentence_task(n_classes=2, n_train_per_class=6, n_val_per_class=1)
    target = [{"id": f"t{i}", "text": t, "class": c} for i, (t, c) in enumerate([("ab", "x"), ("cd", "y"), ("ef", "y")])]
    model = save_tiny_model(tmp_path / "model")
    paths = write_parquet(train, tmp_path / "train.parquet"), write_parquet(target, tmp_path / "target.parquet")
    vm = forvalue_ray.load_model(str(model))
    dense = target_statistics(vm, target, groups=[r["class"] for r in target], stats_form="dense")
    expected = score_against(vm, train, dense)
    with local_ray():
        common = ["--model", model, "--train", paths[0], "--mode", "groups", "--group-column", "class", "--no-progress"]
        run_ok("value", *common, "--target", paths[1], "--out", tmp_path / "a")
        run_ok("value", *common, "--target-stats", tmp_path / "a" / "target", "--out", tmp_path / "b")
    for out in ("a", "b"):
        assert json.loads((tmp_path / out / "run.json").read_text())["target_stats_form"] == "factored"
        got = as_matrix(read_scores(tmp_path / out), [r["id"] for r in train])
        assert rel_err(got, expected) < 1e-5, out
    assert json.loads((tmp_path / "a" / "target" / "target_stats.json").read_text())["form"] == "factored"
