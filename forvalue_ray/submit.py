"""``forvalue-ray submit``: send a YAML-described job to a Ray cluster through its Job API and follow it."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120  # how long to keep retrying a transient error (a freshly started head's job agent, a 5xx)
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0)  # between retries; the last repeats until AGENT_WAIT_S has passed


def transient(e: Exception) -> bool:
    """A Job API error worth retrying: a connection error, an HTTP 5xx, or a head whose job agent is not up yet
    ('No available agent to submit job, please try again later', sent as HTTP 500)."""
    import requests

    if isinstance(e, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)):
        return True
    text = str(e)
    return "No available agent" in text or any(f"status code {code}" in text for code in range(500, 600)) or \
        "try again later" in text


def with_retries(call, what: str, wait_s: float = AGENT_WAIT_S, sleep=time.sleep):
    """``call()``, retried on transient errors with bounded exponential backoff (each retry logged), for at most
    ``wait_s`` seconds; any other error, or the last transient one, is raised."""
    deadline, attempt = time.monotonic() + wait_s, 0
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - sorted by transient()
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            if not transient(e) or time.monotonic() + delay > deadline:
                raise
            attempt += 1
            print(f"submit: {what} failed ({type(e).__name__}: {str(e).strip()[:200]}); retry {attempt} in "
                  f"{delay:g} s", file=sys.stderr, flush=True)
            sleep(delay)


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
    JobConfig.from_dict(config).validate()
    package = Path(__file__).resolve().parent
    work = Path(tempfile.mkdtemp(prefix="forvalue-submit-"))
    try:
        shutil.copytree(package, work / "forvalue_ray", ignore=shutil.ignore_patterns("__pycache__"))
        (work / "job.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        env = load_yaml(runtime_env) if runtime_env else {}
        client = with_retries(lambda: JobSubmissionClient(address), f"connecting to {address}")
        job_id = with_retries(lambda: client.submit_job(
            entrypoint=f"{python} -m forvalue_ray.cli run --config job.yaml",
            runtime_env={**env, "working_dir": str(work)},
            metadata={"forvalue_command": str(config.get("command", "value")),
                      "forvalue_out": str(config.get("out", ""))}), "submitting the job")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"submitted {job_id} to {address}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0
    shown = 0
    while True:
        status = str(with_retries(lambda: client.get_job_status(job_id), "reading the job's status")).rsplit(".", 1)[-1]
        logs = with_retries(lambda: client.get_job_logs(job_id), "reading the job's logs")
        sys.stdout.write(logs[shown:])
        sys.stdout.flush()
        shown = len(logs)
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
