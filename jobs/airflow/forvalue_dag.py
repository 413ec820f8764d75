"""Airflow DAG: value each day's new training data with forvalue-ray, then verify the output.

    wait_for_data  (S3KeySensor: the day's partition has its _SUCCESS marker)
      -> submit    (`forvalue-ray submit --address <ray_address> --config <run config>`, waits for the job)
      -> verify    (`forvalue-ray verify <out>`: the output is complete and exactly-once)

The run config is jobs/configs/llama8b-gpu.yaml (model, mode, actors, dtype, ...) with `train` and
`out` replaced by the run's partition, so every daily run writes its own output directory, and
`target` by the Variable forvalue_target when set. `forvalue-ray submit` ships the config's
contents with the job, so the temporary file only has to exist on the Airflow worker.
Re-running a day is safe: outputs are exactly-once and a run resumes from what its output holds.

Deployment (Airflow 2.7+ or 3.x, on the workers that run these tasks):
  * forvalue-ray installed (`pip install .` from this repository: provides the `forvalue-ray` CLI)
    and the Amazon provider (`apache-airflow-providers-amazon`) for the sensor;
  * this repository's jobs/configs/ reachable: by default the DAG reads
    jobs/configs/llama8b-gpu.yaml relative to the repository this file sits in (ship the repo as
    the DAG bundle / dags folder), or set the environment variable FORVALUE_BASE_CONFIG;
  * Airflow Variables:
      ray_address            Ray dashboard/job address, e.g. http://forvalue-head-svc.ray:8265
      forvalue_train_prefix  s3:// prefix holding one partition per day: <prefix>/<YYYY-MM-DD>/
      forvalue_out_prefix    s3:// prefix for outputs: <prefix>/<YYYYMMDD>/
      forvalue_target        (optional) the target set, overriding the base config's `target`
  * an Airflow connection `aws_default` (or IRSA / instance profile) that can read the marker.
No credentials live in this file.

Parsed (not imported) by tests/test_deploy.py, which needs no Airflow.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2.7+
    from airflow import DAG
    from airflow.decorators import task
    from airflow.operators.bash import BashOperator
from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = os.environ.get(
    "FORVALUE_BASE_CONFIG", str(REPO_ROOT / "jobs/configs/llama8b-gpu.yaml")
)

TRAIN_URI = "{{ var.value.forvalue_train_prefix }}/{{ ds }}/"
OUT_URI = "{{ var.value.forvalue_out_prefix }}/{{ ds_nodash }}"
TARGET_URI = "{{ var.value.get('forvalue_target', '') }}"

default_args = {
    "owner": "forvalue",
    "retries": 1,
    "retry_delay": timedelta(minutes=10),
}

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
    def submit(train_uri: str, out_uri: str, ray_address: str, target_uri: str = "") -> str:
        """Write this run's config (base config, own train/out) and submit it; wait for the job.

        `forvalue-ray submit` exits non-zero when the Ray job fails, which fails this task. A retry
        resubmits the same config: the job resumes from its output rather than duplicating it.
        """
        import yaml

        config = yaml.safe_load(Path(BASE_CONFIG).read_text())
        config.update(command="value", train=train_uri, out=out_uri)
        if target_uri:
            config["target"] = target_uri
        with tempfile.TemporaryDirectory(prefix="forvalue-") as tmp:
            run_config = Path(tmp) / "run.yaml"
            run_config.write_text(yaml.safe_dump(config, sort_keys=False))
            subprocess.run(
                ["forvalue-ray", "submit", "--address", ray_address, "--config", str(run_config)],
                check=True,
            )
        return out_uri

    submitted = submit(
        train_uri=TRAIN_URI,
        out_uri=OUT_URI,
        ray_address="{{ var.value.ray_address }}",
        target_uri=TARGET_URI,
    )

    verify = BashOperator(
        task_id="verify",
        # the same templated path the submit task wrote to (no XCom needed)
        bash_command=f'forvalue-ray verify "{OUT_URI}"',
        retries=0,
    )

    wait_for_data >> submitted >> verify
