"""Airflow DAG: value each day's new training data with forvalue-ray, then verify the output.

    wait_for_data  (S3KeySensor: the day's partition has its _SUCCESS marker)
      -> submit    (`forvalue-ray submit --address <ray_address> --config <run config>`, waits for the job)
      -> verify    (`forvalue-ray verify <out>`: the output is complete and exactly-once)

The run config is a base config (model, mode, actors, dtype, ...; jobs/configs/llama8b-gpu.yaml unless
the Variable forvalue_base_config names another) with `train` and `out` replaced by the run's
partition, so every daily run writes its own output directory, and `target` by the Variable
forvalue_target when set. `forvalue-ray submit` ships the config's contents with the job, so the
temporary file only has to exist on the Airflow worker.

Re-running a day is safe and cheap: outputs are exactly-once, and a job whose output is already
complete does nothing but rewrite run.json, so a second run of the same logical date is a no-op that
still verifies. A job that fails is retried (it resumes from what its output holds), except when the
job itself reported an error a person has to fix (a bad model path, a missing input, an invalid
setting: the `forvalue-ray run: error: ...` line): then the task fails at once, with the end of the
job's log in the exception, and without retries.

Deployment (Airflow 3.x: tested with 3.3.2 and apache-airflow-providers-amazon 9.39.0; the Airflow 2.7+
import fallbacks below are untested):
  * the Amazon provider (`apache-airflow-providers-amazon`) in Airflow's environment;
  * the `forvalue-ray` CLI on the workers that run these tasks. It need not live in Airflow's own
    environment (Airflow's pins and torch's need not meet): set FORVALUE_CLI in the workers'
    environment to the executable, e.g. /opt/forvalue-ray/.venv/bin/forvalue-ray (default: `forvalue-ray`
    on PATH). It only talks to the Ray job API and reads the output; the model runs on the cluster.
  * the whole repository on the Airflow machines (the configs are found from this file's place in it),
    with a local DAG bundle (or the dags folder) at its jobs/airflow; relative config paths are
    resolved against the repository root;
  * Airflow Variables:
      ray_address            Ray dashboard/job address, e.g. http://forvalue-head-svc.ray:8265
      forvalue_train_prefix  s3:// prefix holding one partition per day: <prefix>/<YYYY-MM-DD>/
      forvalue_out_prefix    s3:// prefix (or a path the workers and the cluster share) for outputs:
                             <prefix>/<YYYYMMDD>
      forvalue_target        (optional) the target set, overriding the base config's `target`
      forvalue_base_config   (optional) the base config file (default: the environment variable
                             FORVALUE_BASE_CONFIG, else jobs/configs/llama8b-gpu.yaml)
  * an Airflow connection `aws_default` (keys, a role, IRSA / instance profile; `endpoint_url` in its
    extra for an S3-compatible store). The sensor reads the marker with it, and `verify` reads the
    output with its credentials and endpoint. The Ray job reads and writes S3 with the cluster's own
    identity, never with Airflow's.
No credentials live in this file.

Parsed by tests/deploy/test_deploy.py (no Airflow needed) and run by a real Airflow against a local Ray head
and a local S3 server by tests/deploy/test_airflow_dag.py (`make test-airflow`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
from collections import deque
from datetime import datetime, timedelta, timezone
from pathlib import Path

try:  # Airflow 3
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2.7+
    from airflow import DAG
    from airflow.decorators import task
try:
    from airflow.sdk.exceptions import AirflowFailException
except ImportError:  # Airflow 2.7+
    from airflow.exceptions import AirflowFailException
from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE_CONFIG = "jobs/configs/llama8b-gpu.yaml"

TRAIN_URI = "{{ var.value.forvalue_train_prefix }}/{{ ds }}/"
OUT_URI = "{{ var.value.forvalue_out_prefix }}/{{ ds_nodash }}"
TARGET_URI = "{{ var.value.get('forvalue_target', '') }}"
BASE_CONFIG = "{{ var.value.get('forvalue_base_config', '') }}"

# The job's CLI reports errors a person has to fix (bad model, missing input, invalid setting) on one line
# like this one before it exits; a retry would only fail the same way.
JOB_USER_ERROR = re.compile(r"^forvalue-ray run: error: ")
LOG_TAIL_LINES = 60

log = logging.getLogger("forvalue_dag")  # (the module name Airflow gives a DAG file is mangled)

default_args = {
    "owner": "forvalue",
    "retries": 1,
    "retry_delay": timedelta(minutes=10),
}


def forvalue_cli() -> str:
    """The `forvalue-ray` executable the tasks run: $FORVALUE_CLI on the worker, else `forvalue-ray` on PATH."""
    return os.environ.get("FORVALUE_CLI") or "forvalue-ray"


def _base_config(name: str) -> Path:
    path = Path(name or os.environ.get("FORVALUE_BASE_CONFIG") or DEFAULT_BASE_CONFIG)
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.is_file():
        raise AirflowFailException(
            f"base config {path} not found on this worker: set the Variable forvalue_base_config (or the "
            f"environment variable FORVALUE_BASE_CONFIG) to a config file the workers can read")
    return path


def _run_cli(argv: list[str], env: dict | None = None) -> tuple[int, deque]:
    """Run the forvalue-ray CLI, every output line into the task log as it comes; (exit code, last lines)."""
    tail: deque = deque(maxlen=LOG_TAIL_LINES)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env)
    except FileNotFoundError:
        raise AirflowFailException(
            f"{argv[0]!r} not found on this worker: install forvalue-ray (`pip install .` from this repository) "
            f"or set the environment variable FORVALUE_CLI to its `forvalue-ray` executable") from None
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log.info("%s", line)
    return proc.wait(), tail


with DAG(
    dag_id="forvalue_daily_valuation",
    description="For-Value scores for each day's new fine-tuning data (Ray job), then an exactly-once check",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,  # one valuation job on the Ray cluster at a time
    default_args=default_args,
    tags=["forvalue", "ray"],
) as dag:
    wait_for_data = S3KeySensor(
        task_id="wait_for_data",
        bucket_key=TRAIN_URI + "_SUCCESS",
        aws_conn_id="aws_default",
        mode="reschedule",  # free the worker slot between pokes
        poke_interval=10 * 60,
        timeout=20 * 60 * 60,
    )

    @task(task_id="submit", retries=2, execution_timeout=timedelta(hours=48))
    def submit(train_uri: str, out_uri: str, ray_address: str, target_uri: str = "", base_config: str = "") -> str:
        """Write this run's config (base config, own train/out) and submit it; wait for the job.

        `forvalue-ray submit` streams the job's log (into this task's log) and exits non-zero when the
        Ray job fails, which fails this task. A retry resubmits the same config: the job resumes from its
        output rather than duplicating it.
        """
        import yaml

        if not ray_address:
            raise AirflowFailException("the Airflow Variable ray_address is empty: set it to the Ray dashboard "
                                       "address, e.g. http://forvalue-head-svc.ray:8265")
        path = _base_config(base_config)
        config = yaml.safe_load(path.read_text())
        config.update(command="value", train=train_uri, out=out_uri)
        if target_uri:
            config["target"] = target_uri
        log.info("base config %s; train %s -> out %s on %s", path, train_uri, out_uri, ray_address)
        with tempfile.TemporaryDirectory(prefix="forvalue-") as tmp:
            run_config = Path(tmp) / "run.yaml"
            run_config.write_text(yaml.safe_dump(config, sort_keys=False))
            argv = [forvalue_cli(), "submit", "--address", ray_address, "--config", str(run_config)]
            rc, tail = _run_cli(argv)
        if rc != 0:
            user_error = next((line for line in tail if JOB_USER_ERROR.match(line)), None)
            message = (f"forvalue-ray submit exited {rc} (the Ray job failed, or could not be submitted to "
                       f"{ray_address}); the last lines of its log:\n" + "\n".join(tail))
            if user_error:  # the job's own verdict on its config or inputs: retrying would fail the same way
                raise AirflowFailException(f"{user_error}\n\n{message}")
            raise RuntimeError(message)
        return out_uri

    @task(task_id="verify", retries=0)
    def verify(out_uri: str, aws_conn_id: str = "aws_default") -> dict:
        """`forvalue-ray verify OUT` with the connection's S3 credentials and endpoint; the output's counts."""
        env = dict(os.environ)
        if out_uri.startswith("s3://"):
            from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

            hook = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="s3")
            creds = hook.get_credentials()
            env.update(AWS_ACCESS_KEY_ID=creds.access_key, AWS_SECRET_ACCESS_KEY=creds.secret_key)
            env.pop("AWS_SESSION_TOKEN", None)
            env.pop("AWS_PROFILE", None)
            if creds.token:
                env["AWS_SESSION_TOKEN"] = creds.token
            if hook.conn_config.endpoint_url:
                env["AWS_ENDPOINT_URL"] = hook.conn_config.endpoint_url
            if hook.conn_region_name:
                env["AWS_DEFAULT_REGION"] = hook.conn_region_name
        rc, tail = _run_cli([forvalue_cli(), "verify", out_uri], env=env)
        counts = None
        for line in reversed(tail):  # verify's last line: {"ok": ..., "scored": ..., ...}
            if line.startswith("{"):
                try:
                    counts = json.loads(line)
                except ValueError:
                    pass
                break
        if rc == 1 and isinstance(counts, dict) and counts.get("ok") is False:  # it checked, and found problems
            raise AirflowFailException(f"{out_uri} is incomplete or not exactly-once (clear the submit task to resume "
                                       f"the job into it); forvalue-ray verify says:\n" + "\n".join(tail))
        if rc != 0 or not isinstance(counts, dict) or not counts.get("ok"):
            raise RuntimeError(f"forvalue-ray verify {out_uri} exited {rc} without a verdict (the output could not "
                               f"be read?); the last lines of its log:\n" + "\n".join(tail))
        log.info("verified %s: %s", out_uri, counts)
        return counts

    submitted = submit(
        train_uri=TRAIN_URI,
        out_uri=OUT_URI,
        ray_address="{{ var.value.ray_address }}",
        target_uri=TARGET_URI,
        base_config=BASE_CONFIG,
    )
    verified = verify(submitted)

    wait_for_data >> submitted >> verified
