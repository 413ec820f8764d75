"""`forvalue-ray demo` (what `make demo` runs) end to end on the tiny model, as a newcomer runs it: a process of its
own on a machine where Ray has never run (a fresh HOME, no RAY_AUTH_MODE). Both of its runs finish, its scores are
the in-process API's on the same files, its reports are written, and its console holds only our progress and
results."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import forvalue_ray as fv
from jobtools import REPO, as_matrix, child_env, read_scores, rel_err, save_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# what Ray and its libraries print on their own at INFO level, or about choices they made for us
NOT_OURS = ("Token authentication", "authentication token", "Started a local Ray instance",
            "Starting execution of Dataset", "Execution plan of Dataset", "execution finished",
            "Progress bars", "Warning", "non-writable")


def test_demo_runs_end_to_end_and_scores_as_the_api_does(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "demo"
    env = {k: v for k, v in child_env(HOME=str(tmp_path / "home")).items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run([sys.executable, "-m", "forvalue_ray.cli", "demo", "--out", str(out), "--model",
                           str(model)], cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    assert "Most valuable of 60 training rows" in printed and "Share of corrupted rows" in printed
    shares = [int(s) for s in re.findall(r"among (?:the top|the lowest) 12: (\d+)%", printed)]
    assert len(shares) == 2 and all(0 <= s <= 100 for s in shares), printed
    for run in ("value", "classes"):
        counts = json.loads((out / run / "run.json").read_text())["counts"]
        assert counts["scored"] == 60 and counts["rejected"] == 0, counts
        assert (out / run / "report" / "index.html").stat().st_size > 1000
    # the console: ours, and one line of Ray's own that only a change in Ray removes (docs/scale-and-faults.md)
    console = [line for line in (proc.stdout + proc.stderr).splitlines()
               if "core_worker.cc" not in line or "constructor arguments in the object store" not in line]
    assert not [line for line in console if any(s in line for s in NOT_OURS)], proc.stderr[-3000:]

    # the first run's scores are the API's: the paper's mean score over all text tokens
    train = pq.read_table(out / "data" / "train.parquet").to_pylist()
    target = pq.read_table(out / "data" / "target.parquet").to_pylist()
    vm = fv.load_model(str(model))
    expected = fv.value_scores(vm, train, target, form="text")
    scores = read_scores(out / "value")
    assert rel_err(as_matrix(scores, [r["id"] for r in train])[:, 0], expected) < 1e-5
