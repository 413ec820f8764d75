"""The job against S3 (moto's server standing in: conftest's ``s3_server``): s3:// inputs and output, the same
scores as a local run, resume and `verify` on the bucket. The endpoint and credentials reach the Ray workers through
the environment (AWS_ENDPOINT_URL etc.), set before Ray starts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from forvalue_ray import io as fio
from forvalue_ray.sample_data import sentence_task
from jobtools import cli, local_ray, read_column, read_scores, run_ok, save_tiny_model, target_ids, write_parquet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BUCKET = "forvalue-test"


@pytest.fixture(scope="module")
def s3(s3_server, tmp_path_factory):
    """The bucket with the inputs, and a local Ray started while this process's AWS settings point at the server."""
    import boto3

    root = tmp_path_factory.mktemp("s3")
    train, target = sentence_task(n_classes=3, n_train_per_class=8, n_val_per_class=2, seed=1)
    d = SimpleNamespace(root=root, model=save_tiny_model(root / "model"),
                        train=write_parquet(train, root / "train.parquet", row_group_size=8),
                        target=write_parquet(target, root / "target.parquet"), train_rows=train)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(d.train), BUCKET, "data/train.parquet")
    client.upload_file(str(d.target), BUCKET, "data/target.parquet")
    with local_ray():  # its workers inherit the AWS_* variables from the raylet this process starts
        yield d


def _args(d, train, target, out):
    return ["value", "--model", d.model, "--train", train, "--target", target, "--out", out, "--shard-rows", "8",
            "--no-progress"]


@pytest.fixture(scope="module")
def s3_run(s3):
    out = f"s3://{BUCKET}/runs/value"
    args = _args(s3, f"s3://{BUCKET}/data/train.parquet", f"s3://{BUCKET}/data/target.parquet", out)
    run_ok(*args)
    local = s3.root / "local"
    run_ok(*_args(s3, s3.train, s3.target, local))
    return SimpleNamespace(out=out, args=args, local=local, scores=read_scores(out))


def test_value_on_s3_equals_local_run_and_verifies(s3, s3_run):
    out = s3_run.out
    got, want = s3_run.scores, read_scores(s3_run.local)
    assert sorted(got) == sorted(want) == sorted(r["id"] for r in s3.train_rows)
    ids = sorted(got)
    np.testing.assert_allclose([got[i] for i in ids], [want[i] for i in ids], rtol=1e-12, atol=0)
    assert target_ids(out) == ["mean"]
    assert len(fio.list_parts(f"{out}/scores")) == 3 and len(fio.list_parts(f"{out}/rejected")) == 3
    assert fio.read_json(f"{out}/run.json")["counts"] == json.loads((s3_run.local / "run.json").read_text())["counts"]
    assert fio.exists(f"{out}/target/target_stats.safetensors")
    rc, stdout, _ = cli("verify", out)
    assert rc == 0, stdout
    assert json.loads(stdout.strip().splitlines()[-1])["scored"] == 24
    # resume on the bucket: the same command again finds every part and does nothing
    run_ok(*s3_run.args)
    assert fio.read_json(f"{out}/run.json")["this_invocation"]["shards"] == 0


def test_resume_on_s3_redoes_a_lost_part(s3_run):
    out = s3_run.out
    fs, path = fio.filesystem(f"{out}/scores")
    fs.rm(sorted(fs.ls(path, detail=False))[0])
    rc, stdout, _ = cli("verify", out)
    assert rc == 1 and "1 of 3 shards have no scores part" in stdout, stdout
    fs.invalidate_cache()  # as in a fresh process: the only listing before the actors write is the job's own
    run_ok(*s3_run.args)
    assert fio.read_json(f"{out}/run.json")["this_invocation"]["shards"] == 1
    rc, stdout, _ = cli("verify", out)
    assert rc == 0, stdout
    assert read_scores(out) == s3_run.scores


def test_select_on_s3_equals_a_full_sort(s3, s3_run):
    """select reads the scores and the input from the bucket and writes the selection there, shard by shard."""
    sel = f"s3://{BUCKET}/runs/top"
    rc, stdout, err = cli("select", "--scores", s3_run.out, "--out", sel, "--top-fraction", "0.25")
    assert rc == 0, err
    scores = s3_run.scores
    want = sorted(sorted(scores, key=lambda i: (-scores[i], i))[:round(0.25 * len(scores))])
    tokens = read_column(s3_run.out, "scores", "n_tokens")
    assert json.loads(stdout.strip().splitlines()[-1]) == {"selected": len(want), "written": len(want), "scored": 24,
                                                           "tokens": sum(tokens[i] for i in want)}
    chosen = fio.read_parts(f"{sel}/_selection")
    assert sorted(chosen["id"].to_pylist()) == want
    fs, path = fio.filesystem(sel)
    data_files = [f for f in fs.ls(path, detail=False) if f.endswith(".parquet")]
    rows = [r for f in data_files for r in pq.read_table(f, filesystem=fs).to_pylist()]
    by_id = {r["id"]: r for r in s3.train_rows}
    assert sorted(r["id"] for r in rows) == want and all(r == by_id[r["id"]] for r in rows)
