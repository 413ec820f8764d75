"""Faults and bad inputs in the Ray job (issue #24): what the job does, and what it keeps. One local Ray for the
module; a tiny llama whose '~' overflows (its input embedding is +inf), 10-row shards."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import forvalue_ray as fv
from forvalue_ray import io as fio
from forvalue_ray.artifacts import save_target_stats
from forvalue_ray.job import parts
from jobtools import cli, local_ray, read_column, read_scores, rel_err, run_ok, save_tiny_model, write_parquet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

POISON = "~"
SHARD = 10


def _train(n=40, column="text"):
    return [{"id": f"r{i}", column: f"row {i} says {'abc' * (i % 3 + 1)}", "class": f"c{i % 2}"} for i in range(n)]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_model(root / "model")
    vm = fv.load_model(str(model))
    tok = vm.tokenizer.convert_tokens_to_ids(POISON)
    with torch.no_grad():
        vm.model.get_input_embeddings().weight[tok] = float("inf")
    vm.model.save_pretrained(model)  # the same directory: '~' overflows in every job below
    data = root / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps(_train(), indent=2))  # one pretty-printed JSON array
    targets = [{"id": "t0", "text": "row says abc"}, {"id": "bad", "text": f"row {POISON} abc"},
               {"id": "t2", "text": "says abcabc"}]
    target = write_parquet(targets, root / "target.parquet")
    return SimpleNamespace(root=root, model=model, data=data, target=target, targets=targets,
                           vm=fv.load_model(str(model)))


@pytest.fixture(scope="module")
def ray_local():
    with local_ray():
        yield


def value(d, out, *extra, train=None, target=None):
    return ["value", "--model", d.model, "--train", train or d.data, "--target", target or d.target, "--out", out,
            "--shard-rows", SHARD, "--no-progress", *extra]


@pytest.fixture(scope="module")
def main_run(d, ray_local):
    """A JSON-array training file, an --out inside the input folder, a target row that overflows."""
    out = d.data / "out"
    err = run_ok(*value(d, out))
    return SimpleNamespace(out=out, err=err)


def test_overflowing_target_row_is_rejected_and_the_rest_scored(d, main_run):
    scores = read_scores(main_run.out)
    assert len(scores) == 40 and all(np.isfinite(v) for v in scores.values())
    rej = pq.read_table(main_run.out / "target" / "rejected.parquet").to_pylist()
    assert rej == [{"id": "bad", "reason": rej[0]["reason"]}] and "non-finite" in rej[0]["reason"]
    run = json.loads((main_run.out / "run.json").read_text())
    assert run["target_rows"] == 2 and run["target_rejected"] == 1
    ids = [r["id"] for r in _train()]
    expected = fv.value_scores(d.vm, _train(), [t for t in d.targets if t["id"] != "bad"])
    assert rel_err([scores[i] for i in ids], expected) < 1e-5


def test_json_array_is_read_and_an_out_inside_the_input_is_not_an_input(d, main_run):
    assert json.loads((main_run.out / "run.json").read_text())["counts"]["scored"] == 40
    err = run_ok(*value(d, main_run.out))  # the same command again: finished, not "changed: train_files"
    assert "40 rows scored" in err


def test_reused_target_artifact_rebuilt_in_place_is_refused_on_resume(d, main_run, tmp_path):
    art = tmp_path / "target-a"
    shutil.copytree(main_run.out / "target", art)
    out = tmp_path / "b"
    run_ok("value", "--model", d.model, "--train", d.data / "train.json", "--target-stats", art, "--out", out,
           "--shard-rows", SHARD, "--no-progress")
    for p in sorted((out / "scores").glob("*.parquet"))[:2]:
        p.unlink()  # a crash after two of four shards
    meta = json.loads((art / "target_stats.json").read_text())
    other = fv.target_statistics(d.vm, [{"text": "something else entirely"}], stats_form=meta["form"])
    other.provenance = meta["provenance"]  # the same model: only the content differs
    save_target_stats(other, str(art))
    rc, _, err = cli("value", "--model", d.model, "--train", d.data / "train.json", "--target-stats", art,
                     "--out", out, "--shard-rows", SHARD, "--no-progress")
    assert rc == 2 and "changed: target" in err, err
    assert len(list((out / "scores").glob("*.parquet"))) == 2  # nothing mixed in


def test_sketch_group_column_with_an_overflowing_row(d, ray_local, tmp_path):
    rows = _train(20)
    rows[3]["text"] = f"row {POISON} 3"
    train = write_parquet(rows, tmp_path / "train.parquet", row_group_size=SHARD)
    out = tmp_path / "sk"
    run_ok("sketch", "--model", d.model, "--data", train, "--out", out, "--dim", 64, "--center", 0,
           "--group-column", "class", "--shard-rows", SHARD, "--no-progress")
    groups = read_column(out, "sketches", "class")
    assert len(groups) == 19 and "r3" not in groups and groups["r4"] == "c0" and groups["r5"] == "c1"
    rej = pq.read_table(out / "rejected" / sorted(os.listdir(out / "rejected"))[0]).to_pylist()
    assert [r["id"] for r in rej] == ["r3"]


def test_nothing_scored_exits_nonzero_with_reason_and_columns(d, ray_local, tmp_path):
    train = write_parquet(_train(10, column="body"), tmp_path / "train.parquet")
    rc, _, err = cli(*value(d, tmp_path / "o", train=train))
    assert rc == 2, err
    assert "no row was scored (10 read, 10 rejected: 10×" in err and "'body'" not in err and "body" in err


def test_damaged_parquet_page_fails_at_once_naming_the_file(d, ray_local, tmp_path):
    train = tmp_path / "train.parquet"
    pq.write_table(pq.read_table(write_parquet(_train(20), tmp_path / "ok.parquet")), train, row_group_size=SHARD,
                   compression="snappy")
    meta = pq.ParquetFile(train).metadata
    col = meta.row_group(1).column(1)  # the text column of the second row group: its data page, not the footer
    raw = bytearray(train.read_bytes())
    start = col.data_page_offset + 8
    raw[start:start + 40] = b"\xff" * 40
    train.write_bytes(bytes(raw))
    rc, _, err = cli(*value(d, tmp_path / "o", train=train))
    assert rc == 2 and str(train) in err and "retrying" not in err and "re-run the same command" not in err, err


def test_startup_failures_leave_no_plan(d, tmp_path):
    """A misspelt model or a target with no valid row fails before the plan: the corrected command runs."""
    out = tmp_path / "o"
    rc, _, err = cli(*value(d, out, "--model", str(d.model) + "x"))
    assert rc == 2 and f"not found: {d.model}x" in err and "Repo id" not in err, err
    assert not (out / "_plan.json").exists()
    target = write_parquet([{"body": "abc"}, {"body": "def"}], tmp_path / "t.parquet")
    rc, _, err = cli(*value(d, out, target=target))
    assert rc == 2 and "no valid target rows" in err and "'body'" in err and not (out / "_plan.json").exists(), err
    rc, _, err = cli(*value(d, out, "--mode", "groups", "--group-column", "klass"))
    assert rc == 2 and "no column 'klass'" in err and "'text'" in err, err


def test_plan_of_a_job_with_no_finished_shard_is_replaced(tmp_path):
    shards = fio.plan_shards(str(write_parquet(_train(10), tmp_path / "x.parquet")))
    out = str(tmp_path / "o")
    parts.prepare_out(parts.RunOutput(out), parts.plan_record("scores", {"a": 1}, shards), shards)
    assert parts.prepare_out(parts.RunOutput(out), parts.plan_record("scores", {"a": 2}, shards), shards) == set()
    assert fio.read_json(fio.join(out, "_plan.json"))["settings"] == {"a": 2}
    parts.write_part(out, "scores", shards[0].key, parts.result_table("scores", [], {}), {})
    with pytest.raises(parts.OutputConflict, match="changed: a"):
        parts.prepare_out(parts.RunOutput(out), parts.plan_record("scores", {"a": 3}, shards), shards)


def test_score_names_the_centered_side(tmp_path):
    for name, center in (("idx", "mu1"), ("tgt", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.json").write_text(json.dumps({
            "dim": 64, "seed": 0, "storage": "int8", "model_fingerprint": "f", "center_id": center,
            "center": {"artifact": "runs/idx/center"} if center else None}))
    rc, _, err = cli("score", "--index", tmp_path / "idx", "--target-index", tmp_path / "tgt", "--out", tmp_path / "s")
    assert rc == 2 and "is centered" in err and "is raw" in err and "--center-stats runs/idx/center" in err
    assert "None" not in err, err
    rc, _, err = cli("score", "--index", tmp_path / "tgt", "--target-index", tmp_path / "idx", "--out", tmp_path / "s")
    assert rc == 2 and f"--target-index {tmp_path / 'idx'} is centered" in err and "--center 0" in err, err
