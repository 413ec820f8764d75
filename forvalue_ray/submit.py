"""``forvalue-ray submit``: send a YAML-described job to a Ray cluster through its Job API and follow it."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120  # how long to wait for a freshly started head's job agent


def submit(address: str | None, config_path: str, *, wait: bool = True, poll_s: float = 2.0,
           python: str = "python", runtime_env: str | None = None) -> int:
    """Ship the package and the config as the job's working_dir; entrypoint ``<python> -m forvalue_ray.cli run``.

    ``python`` is the interpreter on the cluster that has torch, transformers and Ray (the image's, e.g.
    ``/opt/venv/bin/python``; plain ``python`` is whatever the head's PATH finds). ``runtime_env`` is a YAML
    file of Ray runtime_env keys merged into the job's (``image_uri``, ``pip``, ``env_vars``, ...).
    Returns 0 when the job succeeded (or was submitted, with ``wait=False``)."""
    from ray.job_submission import JobSubmissionClient

    from .job import JobConfig, load_yaml

    if not address:
        raise ValueError("--address is required (the cluster's dashboard URL, e.g. http://127.0.0.1:8265), "
                         "or set RAY_ADDRESS")
    config = load_yaml(config_path)
    JobConfig.from_dict({**config, "command": config.get("command", "value")}).validate()
    package = Path(__file__).resolve().parent
    work = Path(tempfile.mkdtemp(prefix="forvalue-submit-"))
    try:
        shutil.copytree(package, work / "forvalue_ray", ignore=shutil.ignore_patterns("__pycache__"))
        (work / "job.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        env = load_yaml(runtime_env) if runtime_env else {}
        client = JobSubmissionClient(address)
        deadline = time.time() + AGENT_WAIT_S
        while True:
            try:
                job_id = client.submit_job(entrypoint=f"{python} -m forvalue_ray.cli run --config job.yaml",
                                           runtime_env={**env, "working_dir": str(work)},
                                           metadata={"forvalue_command": str(config.get("command", "value")),
                                                     "forvalue_out": str(config.get("out", ""))})
                break
            except RuntimeError as e:  # a head that has just started: its job agent is not up yet
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                time.sleep(poll_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"submitted {job_id} to {address}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[shown:])
        sys.stdout.flush()
        shown = len(logs)
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
