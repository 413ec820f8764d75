"""Helpers shared by the tests that run the job: tiny models saved as HF directories, Parquet/JSONL files, the CLI
in-process, a local Ray (`local_ray`), a real `ray start` head (`ray_head`), a local S3 server (`moto_s3`), reading
outputs back. The fixtures built on them (`head`, `s3_server`) are in conftest.py."""

from __future__ import annotations

import contextlib
import io as _io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from forvalue_ray import io as fio
from forvalue_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def local_ray(**init_kw):
    """A local Ray for the block, shut down after it: address="local" never attaches to a `ray start` cluster that
    happens to run on this machine; Ray Data's own progress bars off (the job's are on the console)."""
    import ray

    assert not ray.is_initialized(), "another test left Ray initialised"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, **init_kw)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def save_tiny_model(path: Path) -> Path:
    """The tiny random llama (fp32) + char tokenizer as a local HF directory."""
    from forvalue_ray.testing.tiny import tiny_model

    vm = tiny_model("llama", dtype=torch.float32)
    vm.model.save_pretrained(path)
    vm.tokenizer.save_pretrained(path)
    return path


def write_parquet(rows: list[dict], path: Path, row_group_size: int | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(*args: str) -> tuple[int, str, str]:
    """``forvalue-ray ARGS`` in-process: (exit code, stdout, stderr)."""
    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def run_ok(*args: str) -> str:
    rc, out, err = cli(*args)
    assert rc == 0, f"forvalue-ray {' '.join(map(str, args))} exited {rc}:\n{err[-3000:]}\n{out[-2000:]}"
    return err


def read_scores(out: str | Path) -> dict:
    """id → score (float) or scores (np.ndarray), from every part under OUT/scores."""
    table = fio.read_parts(fio.join(str(out), "scores"))
    col = "score" if "score" in table.column_names else "scores"
    values = table[col].to_pylist()
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)), "an id was scored twice"
    return {i: (v if col == "score" else np.asarray(v)) for i, v in zip(ids, values)}


def read_column(out: str | Path, kind: str, column: str) -> dict:
    table = fio.read_parts(fio.join(str(out), kind))
    return dict(zip(table["id"].to_pylist(), table[column].to_pylist()))


def target_ids(out: str | Path) -> list[str]:
    fs, path = fio.filesystem(fio.join(str(out), "targets.parquet"))
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)["id"].to_pylist()


def as_matrix(scores: dict, ids: list[str]) -> np.ndarray:
    return np.stack([np.atleast_1d(np.asarray(scores[i], dtype=np.float64)) for i in ids])


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def child_env(**extra: str) -> dict:
    """Environment for a CLI subprocess: no inherited Ray address, offline hub, repo importable,
    and this interpreter's bin directory first on PATH, so a Ray head started from it runs job entrypoints
    (``python -m forvalue_ray.cli run``) with the project's environment, not whatever ``python`` the machine has."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=os.pathsep.join(filter(None, [os.path.dirname(sys.executable), env.get("PATH")])),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def ray_cli() -> list[str]:
    """The `ray` of this interpreter's environment (never another one found on PATH)."""
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return [exe] if os.path.exists(exe) else [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


@contextlib.contextmanager
def ray_auth_disabled():
    """RAY_AUTH_MODE=disabled in this process for the block (the client side of a cluster without token auth),
    then its old value (or its absence) back."""
    old_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield
    finally:
        if old_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old_auth


@contextlib.contextmanager
def ray_head(log_path: Path, *, num_cpus: int, env: dict[str, str] | None = None):
    """A real `ray start --head` (this interpreter's `ray`) for the block, its output in LOG_PATH. It listens on
    loopback with its own free ports and its own short --temp-dir, so no other Ray on this machine finds it
    (ray.init() without an address looks for <temp dir>/ray_current_cluster), and it is stopped by its own
    process group, never by `ray stop` (which would stop every Ray on the machine). Its environment is
    child_env() plus ENV. Yields .address (the dashboard's, for the Job API) and .env (the head's environment,
    which a `ray job submit` client can use) once the job server answers."""
    import psutil
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="fvh", dir="/tmp")  # short: Ray's unix sockets live under it
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                              "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                              "runtime-env-agent-port", "metrics-export-port")}
    # no token auth (a local test head); on SIGTERM stop at once instead of draining the node for 30 s
    head_env = child_env(RAY_AUTH_MODE="disabled", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", **(env or {}))
    cmd = [*ray_cli(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--num-cpus={num_cpus}", "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           *[f"--{k}={v}" for k, v in ports.items()]]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        def up():
            assert proc.poll() is None, f"`ray start` exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            try:
                JobSubmissionClient(address).list_jobs()
                return True
            except Exception:
                return False

        with ray_auth_disabled():
            wait_for(up, 150, f"the Ray head's job server at {address}", interval=1.0)
        yield SimpleNamespace(address=address, env=head_env)
    finally:
        family = []
        if proc.poll() is None:
            try:
                family = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            proc.send_signal(signal.SIGTERM)  # `ray start --block` drains the node and stops what it started
        deadline = time.time() + 45
        while time.time() < deadline and (proc.poll() is None or any(
                p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)):
            time.sleep(0.5)
        for p in family:  # ours: whatever did not stop
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def moto_s3():
    """moto's S3 server on loopback (a free port) for the block, with this process's AWS settings pointed at it:
    S3_KEYS and AWS_ENDPOINT_URL set, AWS_PROFILE and AWS_SESSION_TOKEN unset, all restored after the block whatever
    happens. A local Ray started inside the block gives its workers the same settings. Yields .endpoint, .keys
    (S3_KEYS) and .env (the keys and the endpoint: what a process started apart, such as a Ray head, needs)."""
    import pytest
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_KEYS, "AWS_ENDPOINT_URL": endpoint}
    try:
        with pytest.MonkeyPatch.context() as patch:
            for k, v in env.items():
                patch.setenv(k, v)
            for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                patch.delenv(k, raising=False)
            yield SimpleNamespace(endpoint=endpoint, keys=dict(S3_KEYS), env=env)
    finally:
        server.stop()
