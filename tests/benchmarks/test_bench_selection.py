"""The selection benchmark's own parts (benchmarks/bench_selection.py, sft.py, less.py), against independent
references: the label noise, the classification answer sets and the own-group rule by hand; the fine-tuning
evaluation against transformers' own loss; LESS's batched per-sample gradients against one backward per row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bench_selection as bs
import sft
from forvalue_ray.testing.tiny import tiny_model


def _rows(n_templates=3, per=6):
    return [{"id": f"r{t}-{i}", "task": "t", "template": f"tpl{t}", "prompt": f"question {t} {i}",
             "response": ["yes", "no", "maybe"][i % 3]} for t in range(n_templates) for i in range(per)]


def test_label_noise_swaps_within_template_and_records_the_rows():
    pool = _rows()
    before = {r["id"]: (r["template"], r["response"]) for r in pool}
    noisy = bs.add_label_noise(pool, 0.5, seed=3)
    assert len(noisy) == 9  # every chosen row has a partner with another response in its template
    by_template: dict = {}
    for tpl, resp in before.values():
        by_template.setdefault(tpl, set()).add(resp)
    for r in pool:
        tpl, old = before[r["id"]]
        if r["id"] in noisy:
            assert r["response"] != old and r["response"] in by_template[tpl]
        else:
            assert r["response"] == old
    assert bs.add_label_noise(_rows(), 0.5, seed=3) == noisy  # seeded


def test_answer_sets_keep_templates_with_few_distinct_responses():
    test = _rows(n_templates=2, per=3)
    many = [{"id": f"m{i}", "task": "t", "template": "tpl1", "prompt": "p", "response": f"r{i}"} for i in range(30)]
    sets = bs.answer_sets(test, [many])
    assert sets == {("t", "tpl0"): ["maybe", "no", "yes"]}  # tpl1 has 33 distinct responses: not classification


def test_own_group_and_choose_by_hand():
    matrix = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.4]])
    names, responses = ["neg", "pos"], ["neg", "neg", "other"]
    assert bs.own_group(matrix, names, responses).tolist() == [0.1, 0.8, 0.5]
    ids = ["c", "a", "b"]
    assert bs.choose(ids, np.array([1.0, 2.0, 2.0]), 2) == [1, 2]  # ties by id: a before b
    # round-robin: target 0's best (a), target 1's best (c), then target 0's second (b)
    assert bs.choose(ids, matrix, 2, "round-robin") == [0, 1]
    assert bs.choose(ids, matrix, 3, "round-robin") == [0, 1, 2]
    # a prompt-fit floor: a (fit -1) is not ranked; b (no fit) and c (fit 0.5) are
    fit = np.array([0.5, -1.0, np.nan])
    assert bs.choose(ids, np.array([1.0, 2.0, 2.0]), 2, fit=fit, min_fit=0.0) == [0, 2]
    assert bs.choose(ids, np.array([1.0, 2.0, 2.0]), 3, fit=fit, min_fit=0.0) == [0, 2]
    # auto, per key: key x's only negative fit is -1.0 (a), so c needs 1.0 and its 0.5 drops it; b has no fit
    fit_keys = {"c": "x", "a": "x", "b": "x"}
    assert bs.choose(ids, np.array([1.0, 2.0, 2.0]), 3, fit=fit, min_fit="auto", fit_keys=fit_keys) == [2]
    assert bs.choose(ids, np.array([1.0, 2.0, 2.0]), 3, fit=fit, min_fit="auto",
                     fit_keys={"c": "y", "a": "x", "b": "x"}) == [0, 2]  # c's key y has no negative fit: floor 0
    # means over the targets: value c 0.5, a 0.5, b 0.45 → a, c (tie by id); embed c 0.5, a 0, b 0.2 → c, b;
    # their sum c 1.0, a 0.5, b 0.65 → c, b
    embed = np.array([[0.5, 0.5], [0.0, 0.0], [0.2, 0.2]])
    assert bs.choose(ids, matrix, 2, embed=embed) == [0, 1]
    assert bs.choose(ids, matrix, 2, embed=embed, by="embed") == [0, 2]
    assert bs.choose(ids, matrix, 2, embed=embed, by="value+embed") == [0, 2]


@pytest.fixture(scope="module")
def tiny():
    vm = tiny_model("llama", dtype=torch.float64)
    rows = [{"id": str(i), "prompt": "abc de"[: 2 + i % 4], "response": "xyz"[: 1 + i % 3]} for i in range(7)]
    enc, kept = sft.encode(vm.tokenizer, rows, max_length=64)
    return vm, enc


def test_evaluate_equals_the_models_own_loss(tiny):
    vm, enc = tiny
    pad_id = vm.tokenizer.pad_token_id
    got = sft.evaluate(vm.model, enc, None, [None] * len(enc), pad_id)["test_loss"]
    total = count = 0.0
    with torch.no_grad():
        for e in enc:  # one row at a time, no padding: transformers' mean loss × valued tokens
            ids, labels = torch.from_numpy(e.input_ids)[None], torch.from_numpy(e.labels)[None]
            loss = vm.model(input_ids=ids, labels=labels).loss
            total += float(loss) * e.n_valued
            count += e.n_valued
    # fp64 model, but transformers' eager attention takes its softmax (and rotary cos/sin) in fp32, and padding
    # changes their rounding: fp32's relative error
    assert got == pytest.approx(total / count, rel=1e-6)


def test_less_batched_gradients_equal_one_backward_per_row(tiny):
    from less import LoraGradients

    vm, enc = tiny
    model = tiny_model("llama", dtype=torch.float64).model
    grads = LoraGradients(model, rank=4, dim=16, block=100)
    got = grads(enc, vm.tokenizer.pad_token_id)
    for i, e in enumerate(enc):
        ids, labels = torch.from_numpy(e.input_ids)[None], torch.from_numpy(e.labels)[None]
        grads.model.zero_grad()
        grads.model(input_ids=ids, labels=labels).loss.backward()  # the row's mean response loss
        flat = torch.cat([m.weight.grad.reshape(-1) for m in grads.layers])[None]
        ref = grads._project(flat)
        ref = (ref / ref.norm()).numpy()[0]
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-6)  # got is stored as float32


def test_fv_joint_auto_is_fv_joint_over_the_rows_auto_keeps():
    """The recommended recipe for a mislabeled pool, run first on a fresh memo (it must compute the pairwise
    cosines, embeddings and prompt fits itself), against fv-joint over the rows whose fit reaches their template's
    RMS of negative fits, computed here by hand."""
    from types import SimpleNamespace

    vm = tiny_model("llama", dtype=torch.float64)
    pool = [{"id": f"p{i:02d}", "template": f"t{i % 2}", "prompt": "abcdefgh"[i % 5: i % 5 + 3],
             "response": "xyzuvw"[i % 4: i % 4 + 2]} for i in range(16)]
    target = [{"id": f"q{j}", "prompt": "bcd"[: 1 + j], "response": "yz"} for j in range(3)]
    args = SimpleNamespace(max_length=64, prompt_fit_column="template", min_prompt_fit=0.0, center=4)
    memo: dict = {}
    auto = bs.fv_api("fv-joint-auto", vm, pool, target, args, memo)
    joint = bs.fv_api("fv-joint", vm, pool, target, args, memo)
    fit = memo["fit"]
    floor = {}
    for key in ("t0", "t1"):
        neg = [f for f, r in zip(fit, pool) if r["template"] == key and f < 0]
        floor[key] = float(np.sqrt(np.mean(np.square(neg)))) if neg else 0.0
    keep = [i for i, r in enumerate(pool) if fit[i] >= floor[r["template"]]]
    assert 0 < len(keep) < len(pool)  # the floor bites and leaves rows to rank
    ids = [r["id"] for r in pool]
    k = len(keep) - 1
    got = bs.choose(ids, auto.pop("values"), k, **auto)
    sub = {kw: (v[keep] if isinstance(v, np.ndarray) else v) for kw, v in joint.items()}
    want = [keep[i] for i in bs.choose([ids[i] for i in keep], sub.pop("values"), k, **sub)]
    assert got == sorted(want)
