"""``token_contributions`` and ``forvalue-ray explain``: a row's score split into one term per token.

Each token's term is checked against the autograd oracle token by token (the LM-head gradient of that token's
log-likelihood alone, inner product with the target side), and the terms of a row sum to the score that
``score_against`` / ``pairwise_scores`` give, in every mode: mean (dense and factored statistics), groups, cosine,
centered, pairwise (plain and cosine)."""

from __future__ import annotations

import copy
import html
import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import forvalue_ray as fv
from forvalue_ray.encode import IGNORE
from forvalue_ray.testing.tiny import oracle_gradients, tiny_model

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


# ---- forvalue-ray explain: the job and the command line on a real local Ray ------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Three value runs of the tiny model on a Parquet corpus (mean centered, groups, pairwise cosine), in 3 shards."""
    from forvalue_ray.sample_data import sentence_task
    from jobtools import local_ray, run_ok, save_tiny_model, write_parquet

    root = tmp_path_factory.mktemp("explain")
    train, target = sentence_task(n_classes=3, n_train_per_class=5, n_val_per_class=1, seed=2)
    train.append({"id": "html-row", "prompt": "<i>x</i> ->", "response": " <script>alert(1)</script> & co", "class": 0,
                  "text": "", "corrupted": False})
    model = save_tiny_model(root / "model")
    train_path = write_parquet(train, root / "train.parquet", row_group_size=6)
    target_path = write_parquet(target, root / "target.parquet")
    common = ["--model", model, "--train", train_path, "--target", target_path, "--shard-rows", 6, "--no-progress",
              "--form", "prompt_response"]
    with local_ray():
        run_ok("value", *common, "--out", root / "mean", "--center", 4)
        run_ok("value", *common, "--out", root / "groups", "--mode", "groups", "--group-column", "class")
        run_ok("value", *common, "--out", root / "pairwise", "--mode", "pairwise", "--normalize")
        yield SimpleNamespace(root=root, train=train, target=target, train_path=train_path)


def _explained(d) -> dict:
    t = pq.read_table(d / "tokens.parquet").to_pylist()
    return {r["id"]: r for r in t}


def _check_sums(rows: dict, scores: dict, column=None):
    """Σ_t c_t (float32 terms) equals the score in OUT's parts; the table's score is that score."""
    for rid, r in rows.items():
        s = scores[rid] if column is None else (np.mean(scores[rid]) if column == "mean" else scores[rid][column])
        c = np.asarray(r["contributions"], dtype=np.float64)
        assert len(c) == len(r["tokens"]) == len(r["offsets"]) == len(r["valued"])
        assert abs(c.sum() - s) <= 1e-5 * max(np.abs(c).sum(), 1e-12), (rid, c.sum(), s)
        assert r["score"] == pytest.approx(s, rel=1e-12)
        assert not np.any(c[~np.asarray(r["valued"])])
        text = "".join(r["tokens"])
        assert [text[o:o + len(p)] for o, p in zip(r["offsets"], r["tokens"])] == r["tokens"]


def test_explain_bottom_rows_of_a_centered_mean_run(job):
    from jobtools import read_scores, run_ok

    out = job.root / "mean" / "explain"
    run_ok("explain", "--scores", job.root / "mean", "--bottom", 4, "--out", out)
    rows, scores = _explained(out), read_scores(job.root / "mean")
    assert list(rows) == sorted(scores, key=lambda i: (scores[i], i))[:4]  # the bottom 4, lowest first
    _check_sums(rows, scores)
    meta = json.loads((out / "explain.json").read_text())
    assert meta["centered"] and meta["in_process"] and meta["mode"] == "mean"


def test_explain_groups_per_group_against_one_target(job):
    from jobtools import read_scores, run_ok, target_ids

    out = job.root / "groups-explain"
    names = target_ids(job.root / "groups")
    run_ok("explain", "--scores", job.root / "groups", "--top", 2, "--per-group", "class", "--target", names[1],
           "--out", out)
    rows, scores = _explained(out), read_scores(job.root / "groups")
    by_class = {}
    for r in job.train:
        by_class.setdefault(str(r["class"]), []).append(r["id"])
    assert sorted(rows) == sorted(i for ids in by_class.values()
                                  for i in sorted(ids, key=lambda i: (-scores[i][1], i))[:2])
    assert {r["group"] for r in rows.values()} == set(by_class)
    _check_sums(rows, scores, column=1)
    rc_ok, _, err = _cli("explain", "--scores", job.root / "groups", "--top", 2, "--target", "nope", "--out", out)
    assert rc_ok == 2 and "not a target of this output" in err


def test_explain_pairwise_ids_and_the_mean_over_targets(job):
    from jobtools import read_scores, run_ok, target_ids

    scores, names = read_scores(job.root / "pairwise"), target_ids(job.root / "pairwise")
    ids = ["html-row", job.train[0]["id"]]
    out = job.root / "pw-one"
    run_ok("explain", "--scores", job.root / "pairwise", "--ids", ",".join(ids), "--target", names[2], "--out", out)
    rows = _explained(out)
    assert list(rows) == ids
    _check_sums(rows, scores, column=2)
    out_all = job.root / "pw-all"
    run_ok("explain", "--scores", job.root / "pairwise", "--ids", ids[1], "--out", out_all)
    _check_sums(_explained(out_all), scores, column="mean")
    page = (out / "index.html").read_text()
    assert "<script" not in page and "&lt;" in page  # every text escaped: the row's own tags are text
    shown = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert "".join(rows["html-row"]["tokens"]) in shown and "<" in "".join(rows["html-row"]["tokens"])
    assert "class='p'" in page and "class='legend'" in page
    rc, _, err = _cli("explain", "--scores", job.root / "pairwise", "--ids", "no-such-id", "--out", out)
    assert rc == 2 and "not scored" in err


def test_explain_through_model_actors_equals_in_process(job):
    """More rows than --local-rows go through the executor's model actors: the same table."""
    from jobtools import run_ok

    local, remote = job.root / "groups-local", job.root / "groups-actors"
    run_ok("explain", "--scores", job.root / "groups", "--bottom", 5, "--out", local)
    run_ok("explain", "--scores", job.root / "groups", "--bottom", 5, "--out", remote, "--local-rows", 0)
    a, b = pq.read_table(local / "tokens.parquet"), pq.read_table(remote / "tokens.parquet")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert not json.loads((remote / "explain.json").read_text())["in_process"]
    for x, y in zip(a.to_pylist(), b.to_pylist()):
        assert x["tokens"] == y["tokens"]
        np.testing.assert_allclose(x["contributions"], y["contributions"], rtol=1e-4, atol=1e-6)


def test_report_links_the_explanation_and_shows_worst_spans(job):
    from forvalue_ray.report import write_report

    out = job.root / "mean"
    if not (out / "explain" / "tokens.parquet").exists():
        test_explain_bottom_rows_of_a_centered_mean_run(job)
    page = Path(write_report(str(out), top=4)).read_text()
    assert "explain/index.html" in page
    bottom = page[page.index("id='bottom-rows'"):]
    bottom = bottom[:bottom.index("</table>")]
    assert "worst 3-token span" in bottom and bottom.count("class='span'") == 4


def _cli(*args):
    from jobtools import cli

    return cli(*args)


def test_explain_page_in_a_browser(job):
    """The page loads cleanly in headless Chromium; rows are ordered by their worst span, most negative first."""
    from browser import headless_chromium, missing

    from forvalue_ray.explain_page import worst_span

    if missing():
        pytest.skip(f"the headless browser test {missing()}")
    out = job.root / "mean" / "explain"
    if not (out / "tokens.parquet").exists():
        test_explain_bottom_rows_of_a_centered_mean_run(job)
    import shutil
    import tempfile

    profile = tempfile.mkdtemp(prefix="forvalue-chromium-")
    driver = headless_chromium(profile)
    try:
        driver.get((out / "index.html").as_uri())
        page = driver.execute_script("""
            return {ready: document.readyState,
                    rows: Array.from(document.querySelectorAll('.row .meta .rid')).map(b => b.textContent),
                    coloured: document.querySelectorAll('.text span.t').length,
                    worst: document.querySelectorAll('.text span.w').length,
                    grey: document.querySelectorAll('.text span.p').length};""")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    assert not errors and page["ready"] == "complete"
    rows = _explained(out)
    order = sorted(rows, key=lambda i: (worst_span(rows[i]["contributions"], rows[i]["valued"])[2], i))
    assert page["rows"] == order
    assert page["worst"] == 3 * len(rows) and page["grey"] > 0
    assert page["coloured"] == sum(sum(r["valued"]) for r in rows.values())
