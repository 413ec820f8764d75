"""jobs/airflow/forvalue_dag.py executed by a real Airflow (`airflow dags test`, SQLite metadata DB in a temp
AIRFLOW_HOME) against a local S3 server (moto) and a real local `ray start --head`.

Airflow lives in its own virtual environment (`make airflow-env` creates .venv-airflow; its pins never touch
the project's .venv). Its tasks run the project's `forvalue-ray` through FORVALUE_CLI, so Airflow's
environment needs no torch. Variables and the `aws_default` connection come from AIRFLOW_VAR_* and
AIRFLOW_CONN_AWS_DEFAULT (endpoint_url: the moto server); Airflow's processes get no other AWS settings,
so the sensor and `verify` reach S3 only through the connection. The Ray head (loopback, own ports, own
short --temp-dir, stopped by its own process group, never `ray stop`) gets the S3 endpoint and keys in
its environment, as a cluster gets its own identity, and runs job entrypoints with this interpreter.

  1. a day whose partition has its _SUCCESS marker: sensor, submit (the job reads the partition from S3 and
     writes its output to S3) and verify succeed; the output verifies with every row scored once;
  2. the same logical date again: the job does nothing (no shard redone) and verify still passes;
  3. a day whose base config names a model that does not exist: the job fails, the submit task is failed
     at once (no retry) with the job's own error and the end of its log in the task log; verify does not run.

Runs only under `make test-airflow` (which sets FORVALUE_AIRFLOW_VENV); skipped in `make test`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

AIRFLOW_VENV = os.environ.get("FORVALUE_AIRFLOW_VENV")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not AIRFLOW_VENV, reason="the Airflow DAG run needs Airflow in its own venv: "
                                                "`make test-airflow` creates .venv-airflow and runs this test"),
]

DAG_ID = "forvalue_daily_valuation"
BUCKET = "forvalue-airflow"
DAY, BAD_DAY = "2026-01-15", "2026-01-16"
PROJECT_BIN = os.path.dirname(sys.executable)  # the project's venv: `forvalue-ray`, `ray`, job entrypoints
BAD_MODEL = "/nonexistent/forvalue-airflow-test-model"


@pytest.fixture(scope="module")
def airflow_bin() -> Path:
    exe = Path(AIRFLOW_VENV or "", "bin", "airflow")
    if not exe.exists():
        pytest.fail(f"FORVALUE_AIRFLOW_VENV={AIRFLOW_VENV} has no bin/airflow: run `make airflow-env` "
                    f"(or `rm -rf {AIRFLOW_VENV}` and run `make test-airflow` to rebuild it)")
    return exe


@pytest.fixture(scope="module")
def s3(s3_server, tmp_path_factory):
    """conftest's moto S3 server (this process reads the outputs back through it), with the two days' partitions
    (data + _SUCCESS), the target set and a tiny model."""
    import boto3
    from forvalue_ray.sample_data import sentence_task
    from jobtools import save_tiny_model, write_parquet

    root = tmp_path_factory.mktemp("airflow")
    endpoint = s3_server.endpoint
    train, target = sentence_task(n_classes=3, n_train_per_class=8, n_val_per_class=2, seed=3)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    for day in (DAY, BAD_DAY):
        part = write_parquet(train, root / f"train-{day}.parquet", row_group_size=8)
        client.upload_file(str(part), BUCKET, f"train/{day}/part-00000.parquet")
        client.put_object(Bucket=BUCKET, Key=f"train/{day}/_SUCCESS", Body=b"")
    client.upload_file(str(write_parquet(target, root / "target.parquet")), BUCKET, "target/target.parquet")
    model = save_tiny_model(root / "model")
    # the small base configs the DAG gets through the Variable forvalue_base_config
    small = {"command": "value", "model": str(model), "train": "set-by-the-dag", "target": "set-by-the-dag",
             "out": "set-by-the-dag", "shard_rows": 8, "num_actors": "1", "progress": False}
    (root / "small.yaml").write_text(yaml.safe_dump(small, sort_keys=False))
    (root / "bad-model.yaml").write_text(yaml.safe_dump({**small, "model": BAD_MODEL}, sort_keys=False))
    yield SimpleNamespace(root=root, endpoint=endpoint, keys=s3_server.keys, client=client, n_train=len(train),
                          train_ids=sorted(r["id"] for r in train))


@pytest.fixture(scope="module")
def ray_head_options(s3_server):
    """conftest's ``head``, the local Ray head: the S3 endpoint and keys in its environment."""
    return {"num_cpus": 4, "env": s3_server.env}


@pytest.fixture(scope="module")
def airflow(airflow_bin, s3, head):
    """A temp AIRFLOW_HOME with a migrated SQLite DB; run(day, base_config) runs `airflow dags test`."""
    from jobtools import REPO

    home = s3.root / "airflow-home"
    home.mkdir()
    venv_bins = {PROJECT_BIN, str(airflow_bin.parent)}
    path = [str(airflow_bin.parent)] + [p for p in os.environ.get("PATH", "").split(os.pathsep) if p not in venv_bins]
    # nothing of the project's environment or of this process's S3 settings: Airflow reaches S3 only
    # through its connection, and forvalue-ray only through FORVALUE_CLI
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "AIRFLOW", "RAY_", "PYTEST", "FORVALUE"))
            and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    connection = {"conn_type": "aws", "login": s3.keys["AWS_ACCESS_KEY_ID"],
                  "password": s3.keys["AWS_SECRET_ACCESS_KEY"],
                  "extra": {"endpoint_url": s3.endpoint, "region_name": s3.keys["AWS_DEFAULT_REGION"]}}
    env = {**base, "PATH": os.pathsep.join(path), "AIRFLOW_HOME": str(home),
           # the DAG installed as the README says: a local bundle at the repository's jobs/airflow
           "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps([{
               "name": "forvalue", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
               "kwargs": {"path": str(REPO / "jobs" / "airflow")}}]),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
           "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection),
           "AIRFLOW_VAR_RAY_ADDRESS": head.address,
           "AIRFLOW_VAR_FORVALUE_TRAIN_PREFIX": f"s3://{BUCKET}/train",
           "AIRFLOW_VAR_FORVALUE_OUT_PREFIX": f"s3://{BUCKET}/out",
           "AIRFLOW_VAR_FORVALUE_TARGET": f"s3://{BUCKET}/target/target.parquet",
           "FORVALUE_CLI": os.path.join(PROJECT_BIN, "forvalue-ray"),
           "RAY_AUTH_MODE": "disabled",  # the client side of a head without token auth
           "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    migrate = subprocess.run([str(airflow_bin), "db", "migrate"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert migrate.returncode == 0, f"airflow db migrate exited {migrate.returncode}:\n{migrate.stderr[-4000:]}"
    print(f"airflow db migrate: {time.time() - t0:.1f} s", file=sys.stderr)

    def run(day: str, base_config: Path) -> SimpleNamespace:
        t = time.time()
        result = subprocess.run([str(airflow_bin), "dags", "test", DAG_ID, day],
                                env={**env, "AIRFLOW_VAR_FORVALUE_BASE_CONFIG": str(base_config)},
                                capture_output=True, text=True, timeout=900)
        log_text = result.stdout + result.stderr
        (s3.root / f"dags-test-{day}-{int(t)}.log").write_text(log_text)
        print(f"airflow dags test {day}: {time.time() - t:.1f} s, exit {result.returncode}", file=sys.stderr)
        return SimpleNamespace(rc=result.returncode, log=log_text, states=_task_states(home, day),
                               seconds=time.time() - t)

    return SimpleNamespace(run=run, home=home)


def _task_states(home: Path, day: str) -> dict:
    """task_id → (state, try_number) of the latest run of DAG_ID for the logical date `day`."""
    with sqlite3.connect(home / "airflow.db") as db:
        runs = db.execute("SELECT run_id, logical_date FROM dag_run WHERE dag_id = ?", (DAG_ID,)).fetchall()
        run_ids = [r for r, logical in runs if str(logical).startswith(day)]
        assert len(run_ids) == 1, f"expected one run of {DAG_ID} for {day}, found {runs}"
        rows = db.execute("SELECT task_id, state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ?",
                          (DAG_ID, run_ids[0])).fetchall()
    return {task_id: (state, tries) for task_id, state, tries in rows}


def _verify_xcom(home: Path, day: str) -> dict:
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute("SELECT x.value FROM xcom x JOIN dag_run r ON x.dag_run_id = r.id "
                          "WHERE x.dag_id = ? AND x.task_id = 'verify' AND x.key = 'return_value' "
                          "AND r.logical_date LIKE ?", (DAG_ID, f"{day}%")).fetchall()
    assert len(rows) == 1, rows
    value = json.loads(rows[0][0])
    return json.loads(value) if isinstance(value, str) else value


def _fail_detail(run) -> str:
    return f"exit {run.rc}, task states {run.states}; end of the `airflow dags test` output:\n{run.log[-6000:]}"


def _verified(out: str) -> dict:
    from jobtools import cli

    rc, stdout, _ = cli("verify", out)
    assert rc == 0, stdout
    # the summary is verify's last JSON line; this process is a driver of the head's Ray, whose log monitor may
    # print a worker's line (e.g. the raylet's "N PYTHON worker processes have been started") around it
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _parts(s3, prefix: str) -> dict:
    listing = s3.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing}


@pytest.fixture(scope="module")
def first_run(airflow, s3):
    return airflow.run(DAY, s3.root / "small.yaml")


def test_dag_values_the_day_from_s3_and_verifies(airflow, s3, first_run):
    from forvalue_ray import io as fio
    from jobtools import read_scores

    run = first_run
    assert run.rc == 0, _fail_detail(run)
    assert run.states == {"wait_for_data": ("success", 1), "submit": ("success", 1), "verify": ("success", 1)}, \
        _fail_detail(run)
    out = f"s3://{BUCKET}/out/{DAY.replace('-', '')}"
    # the submit task's log carries the job's own log, streamed by `forvalue-ray submit`
    assert "SUCCEEDED" in run.log
    counts = _verified(out)
    assert counts["ok"] and counts["scored"] == s3.n_train and counts["shards"] == 3, counts
    assert _verify_xcom(airflow.home, DAY) == counts  # what the verify task saw is what is there
    assert sorted(read_scores(out)) == s3.train_ids
    job = fio.read_json(f"{out}/run.json")
    assert job["this_invocation"]["shards"] == 3
    assert job["config"]["train"] == f"s3://{BUCKET}/train/{DAY}/"
    assert job["config"]["target"] == f"s3://{BUCKET}/target/target.parquet"
    assert job["config"]["model"] == str(s3.root / "model")


def test_second_run_of_the_same_day_is_a_noop_that_verifies(airflow, s3, first_run):
    assert first_run.rc == 0, "the first run failed (see the test above)"
    from forvalue_ray import io as fio
    from jobtools import read_scores

    out = f"s3://{BUCKET}/out/{DAY.replace('-', '')}"
    prefix = f"out/{DAY.replace('-', '')}/"
    before = {k: v for k, v in _parts(s3, prefix).items() if "/scores/" in k or "/rejected/" in k or "/target/" in k}
    scores_before = read_scores(out)
    run = airflow.run(DAY, s3.root / "small.yaml")
    assert run.rc == 0, _fail_detail(run)
    assert run.states == {"wait_for_data": ("success", 1), "submit": ("success", 1), "verify": ("success", 1)}, \
        _fail_detail(run)
    assert fio.read_json(f"{out}/run.json")["this_invocation"]["shards"] == 0  # nothing redone
    after = {k: v for k, v in _parts(s3, prefix).items() if k in before}
    assert after == before  # no part (or target artifact) rewritten
    assert read_scores(out) == scores_before
    counts = _verified(out)
    assert counts["ok"] and counts["scored"] == s3.n_train
    assert _verify_xcom(airflow.home, DAY) == counts


def test_failed_job_fails_the_submit_task_with_the_job_log_tail(airflow, s3, first_run):
    run = airflow.run(BAD_DAY, s3.root / "bad-model.yaml")
    assert run.rc != 0 and "DagRun failed" in run.log, _fail_detail(run)
    # failed at once: one try, no retry (the job reported an error a person has to fix)
    assert run.states["wait_for_data"] == ("success", 1), _fail_detail(run)
    assert run.states["submit"] == ("failed", 1), _fail_detail(run)
    assert run.states["verify"][0] == "upstream_failed", _fail_detail(run)
    # the task log holds the job's log tail and its own error, naming the model path
    assert "the last lines of its log" in run.log, _fail_detail(run)
    assert "forvalue-ray run: error:" in run.log and BAD_MODEL in run.log, _fail_detail(run)
    assert "FAILED" in run.log
    # nothing was written for that day beyond what a refused job leaves
    assert not any("/scores/" in k for k in _parts(s3, f"out/{BAD_DAY.replace('-', '')}/"))
