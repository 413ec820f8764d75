"""Centering: scores against Ḡ − μ, μ the mean gradient of a sample of the training rows, equal inner products
of autograd LM-head gradients (API), and the job's --center equals the API on the sample it recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest

import forvalue_ray as fv
from forvalue_ray.job.center import sample_training_rows
from forvalue_ray.sample_data import sentence_task
from forvalue_ray.testing.tiny import oracle_gradients, tiny_model

pytestmark = pytest.mark.timeout(1800)  # the job tests start a local Ray: slow on a loaded machine

TRAIN = [{"text": "the cat sat on the mat"}, {"prompt": "Q: 2+2?", "response": " A: 4"}, {"text": "zebra!"},
         {"text": "a dog ran far"}, {"prompt": "Q: 5-1?", "response": " A: 4"}]
TARGET = [{"text": "a cat on a mat"}, {"prompt": "Q: 3+3?", "response": " A: 6"}, {"text": "zebras and cats"}]
GROUPS = ["animals", "math", "animals"]
SAMPLE = [TRAIN[0], TRAIN[2], TRAIN[4]]


def rel_err(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b))


@pytest.fixture(scope="module")
def oracle():
    vm = tiny_model("gemma2")  # soft-capping and tied embeddings: the general head
    return vm, *(oracle_gradients(vm, fv.encode_rows(vm, rows)) for rows in (TRAIN, TARGET, SAMPLE))


def test_centered_mean_matches_autograd(oracle):
    vm, g_train, g_target, g_sample = oracle
    mu = g_sample.mean(0)
    expected = (g_train @ (g_target.mean(0) - mu)).numpy()
    assert rel_err(fv.value_scores(vm, TRAIN, TARGET, center=SAMPLE, vocab_chunk=48), expected) < 1e-5
    # ranks like the centered inner product ⟨G − μ, Ḡ − μ⟩: the difference is one constant for every row
    centered = ((g_train - mu) @ (g_target.mean(0) - mu)).numpy()
    assert np.ptp(centered - expected) < 1e-6 * np.abs(expected).max()
    # statistics of the sample given instead of its rows
    stats = fv.target_statistics(vm, SAMPLE, stats_form="dense")
    assert rel_err(fv.value_scores(vm, TRAIN, TARGET, center=stats), expected) < 1e-5


def test_centered_groups_match_autograd(oracle):
    vm, g_train, g_target, g_sample = oracle
    names, scores = fv.group_scores(vm, TRAIN, TARGET, GROUPS, center=SAMPLE, vocab_chunk=37)
    assert names == ["animals", "math"]
    for k, name in enumerate(names):
        members = [j for j, g in enumerate(GROUPS) if g == name]
        expected = (g_train @ (g_target[members].mean(0) - g_sample.mean(0))).numpy()
        assert rel_err(scores[:, k], expected) < 1e-5


def test_centering_refuses_what_it_does_not_define(oracle):
    vm = oracle[0]
    with pytest.raises(ValueError, match="normalize"):
        fv.value_scores(vm, TRAIN, TARGET, normalize=True, center=SAMPLE)
    two_groups = fv.target_statistics(vm, TARGET, groups=GROUPS, stats_form="dense")
    with pytest.raises(ValueError, match="one group"):
        fv.value_scores(vm, TRAIN, TARGET, center=two_groups)


def test_sample_training_rows_is_seeded_and_uniform(tmp_path):
    from forvalue_ray import io
    from jobtools import write_parquet

    rows = [{"id": f"r{i}", "text": f"row {i}"} for i in range(200)]
    shards = io.plan_shards(str(write_parquet(rows, tmp_path / "t.parquet", row_group_size=10)), shard_rows=10)
    assert len(shards) == 20
    sample, read = sample_training_rows(shards, 30, seed=1)
    again, _ = sample_training_rows(shards, 30, seed=1)
    assert [r["id"] for _, r in sample] == [r["id"] for _, r in again]
    assert len({r["id"] for _, r in sample}) == 30 and len(read) == 16  # at least 16 shards read, then enough rows
    assert [r["id"] for _, r in sample_training_rows(shards, 30, seed=2)[0]] != [r["id"] for _, r in sample]
    everything, read_all = sample_training_rows(shards, 500, seed=0)  # more than there is: every row, once
    assert sorted(r["id"] for _, r in everything) == sorted(r["id"] for r in rows) and len(read_all) == 20
    # uniform over rows: each row's inclusion rate over many seeds is n / N
    hits = np.zeros(200)
    for seed in range(200):
        for _, r in sample_training_rows(shards, 30, seed=seed)[0]:
            hits[int(r["id"][1:])] += 1
    assert np.abs(hits / 200 - 0.15).max() < 0.1  # binomial sd 0.025


# ---- the job ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from jobtools import local_ray, run_ok, save_tiny_model, write_parquet

    root = tmp_path_factory.mktemp("center")
    train, target = sentence_task(n_classes=3, n_train_per_class=8, n_val_per_class=2, seed=3)
    model = save_tiny_model(root / "model")
    train_path = write_parquet(train, root / "train.parquet", row_group_size=6)
    target_path = write_parquet(target, root / "target.parquet")
    common = ["--model", model, "--train", train_path, "--target", target_path, "--shard-rows", 6,
              "--form", "prompt_response", "--no-progress"]
    with local_ray():
        run_ok("value", *common, "--out", root / "mean", "--center", 10, "--center-seed", 7)
        run_ok("value", *common, "--out", root / "groups", "--mode", "groups", "--group-column", "class",
               "--center-stats", root / "mean" / "center")
        yield {"root": root, "model": model, "train": train, "target": target, "common": common}


@pytest.mark.slow
def test_job_center_equals_api_on_its_recorded_sample(job):
    from jobtools import read_scores

    vm = fv.load_model(str(job["model"]))
    sample_info = json.loads((job["root"] / "mean" / "center" / "sample.json").read_text())
    by_id = {r["id"]: r for r in job["train"]}
    assert sample_info["rows"] == 10 and sample_info["seed"] == 7 and len(set(sample_info["ids"])) == 10
    sample = [by_id[i] for i in sample_info["ids"]]
    ids = [r["id"] for r in job["train"]]
    expected = fv.value_scores(vm, job["train"], job["target"], center=sample, form="prompt_response")
    got = read_scores(job["root"] / "mean")
    assert rel_err([got[i] for i in ids], expected) < 1e-5
    # independently: the difference of two plain mean-mode valuations
    plain = fv.value_scores(vm, job["train"], job["target"], form="prompt_response")
    against_sample = fv.value_scores(vm, job["train"], sample, form="prompt_response")
    assert rel_err([got[i] for i in ids], plain - against_sample) < 1e-5
    run = json.loads((job["root"] / "mean" / "run.json").read_text())
    assert run["center_rows"] == 10 and run["config"]["center"] == 10
    assert (job["root"] / "mean" / "center" / "target_stats.safetensors").exists()


@pytest.mark.slow
def test_job_groups_with_reused_center_stats(job):
    from jobtools import read_scores, target_ids

    from forvalue_ray.artifacts import load_target_stats

    vm = fv.load_model(str(job["model"]))
    center = load_target_stats(str(job["root"] / "mean" / "center"))
    names, expected = fv.group_scores(vm, job["train"], job["target"], [r["class"] for r in job["target"]],
                                      center=center, form="prompt_response")
    assert target_ids(job["root"] / "groups") == names
    got = read_scores(job["root"] / "groups")
    assert rel_err(np.stack([got[r["id"]] for r in job["train"]]), expected) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("extra,message", [
    (["--center", 5, "--normalize"], "plain For-Value inner product"),
    (["--center", 5, "--mode", "pairwise"], "pairwise mode keeps no statistics"),
    (["--center", 5, "--center-stats", "somewhere"], "not both"),
    (["--center", -2], "N > 0"),
])
def test_job_refuses_undefined_centering(job, extra, message):
    from jobtools import cli

    rc, _, err = cli("value", *job["common"], "--out", job["root"] / "refused", *extra)
    assert rc == 2 and message in err, err


def test_command_defaults_center_a_sketch_index_but_not_a_value_run():
    """`value` keeps the paper's score unless asked; `sketch` builds the compact default index (dim 4096, int8,
    centered on 1000 sampled rows); --center-stats or --center 0 replace that sample."""
    from forvalue_ray.cli import build_parser, job_config

    def config(*argv):
        args = build_parser().parse_args(list(argv))
        return job_config(args.command, args)

    value = config("value", "--train", "t", "--target", "g", "--out", "o")
    assert (value.center, value.center_stats) == (0, None)
    index = config("sketch", "--data", "d", "--out", "o")
    assert (index.center, index.dim, index.storage) == (1000, 4096, "int8")
    assert config("sketch", "--data", "d", "--out", "o", "--center-stats", "i/center").center == 0
    assert config("sketch", "--data", "d", "--out", "o", "--center", "0").center == 0
    for cfg in (value, index):
        cfg.validate()
    config("sketch", "--data", "d", "--out", "o", "--storage", "binary", "--dim", "8192").validate()
    config("sketch", "--data", "d", "--out", "o", "--storage", "binary", "--dim", "512", "--subspace", "2x4").validate()
    for extra in (["--dim", "1020"], ["--dim", "512", "--subspace", "3x3"]):  # 8 signs to a byte
        with pytest.raises(ValueError, match="multiple of 8"):
            config("sketch", "--data", "d", "--out", "o", "--storage", "binary", *extra).validate()


@pytest.mark.slow
def test_job_subspace_index_equals_api_and_its_target_index_shares_it(job):
    """`sketch --subspace 4x3`: the subspace saved under OUT/center is the API's fit on the recorded sample; every
    index row equals the API's; a target index built with --center-stats takes the same subspace, and `score`
    equals the API's estimate from those rows."""
    from jobtools import read_column, read_scores, run_ok, target_ids, write_parquet

    from forvalue_ray.artifacts import load_subspace, load_target_stats

    root, common = job["root"], ["--model", job["model"], "--shard-rows", 6, "--form", "prompt_response",
                                 "--no-progress", "--dim", 32, "--seed", 5, "--storage", "float32"]
    run_ok("sketch", "--data", write_parquet(job["train"], root / "sub_train.parquet"), "--out", root / "sub", "--center", 10,
           "--center-seed", 7, "--subspace", "4x3", *common)
    run_ok("sketch", "--data", write_parquet(job["target"], root / "sub_target.parquet"), "--out", root / "sub_t",
           "--center-stats", root / "sub" / "center", *common)
    run_ok("score", "--index", root / "sub", "--target-index", root / "sub_t", "--mode", "pairwise",
           "--out", root / "sub_s", "--no-progress")

    vm = fv.load_model(str(job["model"]))
    by_id = {r["id"]: r for r in job["train"]}
    sample = [by_id[i] for i in json.loads((root / "sub" / "center" / "sample.json").read_text())["ids"]]
    center = load_target_stats(str(root / "sub" / "center"))
    saved = load_subspace(str(root / "sub" / "center"))
    fitted = fv.fit_subspace(vm, sample, center, shape="4x3", form="prompt_response")
    np.testing.assert_allclose(saved.vocab.numpy(), fitted.vocab.numpy(), atol=1e-6)
    np.testing.assert_allclose(saved.hidden.numpy(), fitted.hidden.numpy(), atol=1e-6)

    api = {name: fv.centered_sketches(vm, rows, center, dim=32, seed=5, subspace=saved, form="prompt_response")
           for name, rows in (("train", job["train"]), ("target", job["target"]))}
    got = read_column(root / "sub", "sketches", "sketch")
    ids = [r["id"] for r in job["train"]]
    assert rel_err(np.stack([got[i] for i in ids]), api["train"].sketch) < 1e-5
    assert np.stack([got[i] for i in ids]).shape[1] == 4 * 3 + 32
    meta = json.loads((root / "sub" / "index.json").read_text())
    tmeta = json.loads((root / "sub_t" / "index.json").read_text())
    assert meta["subspace"]["shape"] == [4, 3] and tmeta["center_id"] == meta["center_id"]

    names = [str(j) for j in range(len(job["target"]))]
    t = api["target"]
    expected = fv.score_sketches(api["train"].sketch, None, fv.sketch_targets(
        t.sketch, None, names, names, center_dot=t.center_dot, center_sq_norm=t.center_sq_norm),
        center_dot=api["train"].center_dot)
    scores = read_scores(root / "sub_s")
    assert target_ids(root / "sub_s") == [r["id"] for r in job["target"]]
    assert rel_err(np.stack([scores[i] for i in ids]), expected) < 1e-5


@pytest.mark.slow
def test_job_refuses_a_subspace_without_centering(job, tmp_path):
    from jobtools import cli, write_parquet

    data = write_parquet(job["train"], tmp_path / "d.parquet")
    rc, _, err = cli("sketch", "--model", job["model"], "--data", data, "--out", tmp_path / "o", "--center", 0,
                     "--subspace", "4x3", "--no-progress")
    assert rc == 2 and "fitted on the centering sample" in err, err
    rc, _, err = cli("sketch", "--model", job["model"], "--data", data, "--out", tmp_path / "o", "--subspace", "4",
                     "--no-progress")
    assert rc == 2 and "K1xK2" in err, err
