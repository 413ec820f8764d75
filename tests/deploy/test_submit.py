"""Submitting the job to a real Ray cluster through its Job API (marked ``last``: it starts a `ray start`
head, conftest's ``head``). The head listens on loopback with its own ports and its own short --temp-dir, so no
other Ray on this machine finds it (ray.init() without an address looks for <temp dir>/ray_current_cluster), and it
is stopped by its own process group, never by `ray stop` (which would stop every Ray on the machine).

(a) `forvalue-ray submit --address http://127.0.0.1:PORT --config cfg.yaml` — ships the package + config;
(b) `ray job submit --working-dir REPO -- python jobs/run.py --config CFG` — the documented entrypoint.
Both run at the same time on the head; each output must pass `verify`, and they must agree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from forvalue_ray.sample_data import sentence_task
from jobtools import REPO, cli, ray_cli, read_scores, save_tiny_model, write_parquet

pytestmark = [pytest.mark.slow, pytest.mark.last, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def ray_head_options():
    """Room for both jobs at once (conftest's ``head``; `forvalue-ray submit` runs in-process, as its client)."""
    return {"num_cpus": 6}


@pytest.fixture(scope="module")
def job_inputs(head):
    root = head.root
    train, target = sentence_task(n_classes=3, n_train_per_class=8, n_val_per_class=2, seed=2)
    model = save_tiny_model(root / "model")
    paths = {"train": write_parquet(train, root / "train.parquet", row_group_size=8),
             "target": write_parquet(target, root / "target.parquet")}

    def config(name: str):
        cfg = {"command": "value", "model": str(model), "train": str(paths["train"]), "target": str(paths["target"]),
               "out": str(root / f"out-{name}"), "shard_rows": 8, "num_actors": "1", "progress": False}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path, root / f"out-{name}"

    return {"config": config, "n": len(train)}


def _verify(out):
    rc, stdout, _ = cli("verify", out)
    assert rc == 0, stdout
    return json.loads(stdout.strip().splitlines()[-1])


def test_submit_and_ray_job_submit_both_succeed(head, job_inputs):
    cfg_a, out_a = job_inputs["config"]("forvalue-submit")
    cfg_b, out_b = job_inputs["config"]("ray-job-submit")
    # (b) in the background: the `ray job submit` CLI follows the job and exits 1 if it fails
    log_b = open(head.root / "ray-job-submit.log", "w")
    proc_b = subprocess.Popen([*ray_cli(), "job", "submit", "--address", head.address, "--working-dir", str(REPO),
                               "--", "python", "jobs/run.py", "--config", str(cfg_b)],
                              cwd=REPO, env=head.env, stdout=log_b, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # (a) in this process, at the same time
        # the job's interpreter named explicitly, as a cluster whose image keeps its venv off PATH needs it
        rc_a, stdout_a, stderr_a = cli("submit", "--address", head.address, "--config", cfg_a,
                                       "--python", sys.executable)
        assert rc_a == 0, f"forvalue-ray submit exited {rc_a}:\n{stderr_a[-3000:]}\n{stdout_a[-5000:]}"
        assert "SUCCEEDED" in stderr_a
        rc_b = proc_b.wait(timeout=360)
    finally:
        if proc_b.poll() is None:
            os.killpg(proc_b.pid, signal.SIGKILL)
            proc_b.wait()
        log_b.close()
    log_text = (head.root / "ray-job-submit.log").read_text()
    assert rc_b == 0, f"ray job submit exited {rc_b}:\n{log_text[-5000:]}"
    assert "succeeded" in log_text.lower()

    for out in (out_a, out_b):
        counts = _verify(out)
        assert counts["scored"] == job_inputs["n"] and counts["shards"] == 3
        assert (out / "config.resolved.yaml").exists()
    a, b = read_scores(out_a), read_scores(out_b)
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose([a[i] for i in sorted(a)], [b[i] for i in sorted(a)], rtol=1e-12, atol=0)
