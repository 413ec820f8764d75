"""`forvalue-ray demo` (what `make demo` runs) end to end on the tiny model: both of its runs finish, its scores are
the in-process API's on the same files, and its reports are written."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

import forvalue_ray as fv
from forvalue_ray.demo import run_demo
from jobtools import as_matrix, local_ray, read_scores, rel_err, save_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_runs_end_to_end_and_scores_as_the_api_does(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "demo"
    with local_ray():
        result = run_demo(str(out), model=str(model))
    printed = capsys.readouterr().out
    assert "Most valuable of 60 training rows" in printed and "Share of corrupted rows" in printed
    assert result["run"]["counts"]["scored"] == 60 and result["run"]["counts"]["rejected"] == 0
    assert 0.0 <= result["top_class_share"] <= 1.0 and 0.0 <= result["corrupted_share_at_bottom"] <= 1.0
    assert [Path(p).name for p in result["reports"]] == ["index.html", "index.html"]
    assert all(Path(p).stat().st_size > 1000 for p in result["reports"])

    # the first run's scores are the API's: the paper's mean score over all text tokens
    train = pq.read_table(out / "data" / "train.parquet").to_pylist()
    target = pq.read_table(out / "data" / "target.parquet").to_pylist()
    vm = fv.load_model(str(model))
    expected = fv.value_scores(vm, train, target, form="text")
    scores = read_scores(out / "value")
    assert rel_err(as_matrix(scores, [r["id"] for r in train])[:, 0], expected) < 1e-5
