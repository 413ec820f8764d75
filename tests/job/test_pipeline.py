"""The distributed job on a real local Ray: what `forvalue-ray value / sketch / score` write
equals the in-memory core API; actors, restarts, a killed driver and re-runs never change a result; bad
rows are set aside with reasons; `verify` and `select` work on what the job wrote.

One local Ray (4 logical CPUs: spare ones, as the job's own local Ray has) serves the whole module; each job run costs
~20-40 s here (actor start-up), so runs are module fixtures shared by several tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import forvalue_ray
from forvalue_ray import io as fio
from forvalue_ray.job import parts, selection, verification
from forvalue_ray.sample_data import sentence_task
from forvalue_ray.testing import faults
from jobtools import (REPO, as_matrix, child_env, cli, local_ray, read_column, read_scores, rel_err, run_ok,
                      save_tiny_model, target_ids, write_jsonl, write_parquet)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

N_SHARDS = 12
SHARD_ROWS = 8
DIM, SEED = 64, 3


# ---- data, model, Ray ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    train, target = sentence_task(n_classes=3, n_train_per_class=32, n_val_per_class=2)
    d = SimpleNamespace(root=root, train_rows=train, target_rows=target)
    d.model = save_tiny_model(root / "model")
    d.train = write_parquet(train, root / "train.parquet", row_group_size=SHARD_ROWS)  # 12 row groups
    d.train_jsonl = write_jsonl(train, root / "train.jsonl")
    d.target = write_parquet(target, root / "target.parquet")
    d.target2 = write_parquet(target[:3], root / "target2.parquet")
    assert pq.ParquetFile(d.train).metadata.num_row_groups == N_SHARDS

    def value_args(out, *extra):
        return ["value", "--model", d.model, "--train", d.train, "--target", d.target, "--out", out,
                "--shard-rows", SHARD_ROWS, "--no-progress", "--target-block-rows", "2", *extra]

    d.value_args = value_args
    return d


@pytest.fixture(scope="module")
def vm(data):
    return forvalue_ray.load_model(str(data.model))


@pytest.fixture(scope="module")
def ray_local(data):
    """One local Ray for the module. Its workers run the fault hook (``forvalue_ray.testing.faults``) with
    FORVALUE_FAULT_EXIT_ONCE set; the marker file exists (hook disarmed) except during the run that arms it
    (``run_a``)."""
    marker = data.root / "fault-marker"
    marker.touch()
    with local_ray(runtime_env={**faults.RUNTIME_ENV, "env_vars": {faults.EXIT_ONCE: str(marker)}}):
        yield marker


def _parts_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((out / "scores").glob("*.parquet")) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def run_a(data, ray_local):
    """mean mode, one model actor; the fault hook is armed for this run: its first model actor to finish a
    shard's rejected part hard-exits before writing the scores part (a killed actor mid-shard)."""
    marker = ray_local
    out = data.root / "a"
    marker.unlink()
    try:
        run_ok(*data.value_args(out, "--num-actors", "1"))
        fired = marker.exists()
    finally:
        marker.touch()
    return SimpleNamespace(out=out, scores=read_scores(out), fault_fired=fired)


@pytest.fixture(scope="module")
def run_b(data, ray_local):
    """The same job with three model actors (and three target workers)."""
    out = data.root / "b"
    run_ok(*data.value_args(out, "--num-actors", "3"))
    return SimpleNamespace(out=out, scores=read_scores(out), parts=_parts_bytes(out))


@pytest.fixture(scope="module")
def rerun_b(data, run_b):
    """Re-run B's command into B's --out (a resume with nothing left to do), with a stale temporary file in
    scores/ like the one a writer killed mid-write leaves and the plan in an older version's form (every shard in
    _plan.json); then two different jobs into the same --out (refused), then one with --overwrite (the cosine
    variant, checked against the core API)."""
    out, args = run_b.out, data.value_args(run_b.out, "--num-actors", "3")
    r = SimpleNamespace()
    stale = out / "scores" / f".tmp-{'0' * 32}-{sorted(run_b.parts)[0]}"
    stale.write_bytes(b"PAR1 half-written part")
    record, shards = parts.RunOutput(str(out)).load_plan()
    (out / "_plan.json").write_text(json.dumps({**record, "fingerprint": "older formula",
                                                "shards": [s.to_dict() for s in shards]}))
    (out / "_plan_shards.parquet").unlink()
    r.noop_rc, _, r.noop_err = cli(*args)
    r.plan_after_noop = (json.loads((out / "_plan.json").read_text()), parts.RunOutput(str(out)).load_plan()[1], shards)
    r.noop_run = json.loads((out / "run.json").read_text())
    r.noop_parts = _parts_bytes(out)
    r.stale_left = stale.exists()
    r.verify_after_noop = cli("verify", out)
    r.max_length_rc, _, r.max_length_err = cli(*args, "--max-length", "1024")
    other = [a if a != data.target else data.target2 for a in args]
    r.target_rc, _, r.target_err = cli(*other)
    r.parts_after_refusals = _parts_bytes(out)
    r.overwrite_rc, _, r.overwrite_err = cli(*args, "--normalize", "--overwrite")
    r.plan = json.loads((out / "_plan.json").read_text())
    r.normalized = read_scores(out) if r.overwrite_rc == 0 else None
    r.verify_after_overwrite = cli("verify", out)
    return r


@pytest.fixture(scope="module")
def core(vm, data):
    """The in-memory core API on the same rows (lazily, per mode)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            tr, tg = data.train_rows, data.target_rows
            if kind == "mean":
                cache[kind] = forvalue_ray.value_scores(vm, tr, tg)
            elif kind == "normalize":
                cache[kind] = forvalue_ray.value_scores(vm, tr, tg, normalize=True)
            elif kind == "groups":
                cache[kind] = forvalue_ray.group_scores(vm, tr, tg, [r["class"] for r in tg])
            elif kind == "pairwise":
                cache[kind] = forvalue_ray.pairwise_scores(vm, tr, tg, embed=True)
            elif kind == "sketch_train":
                cache[kind] = forvalue_ray.sketches(vm, tr, dim=DIM, seed=SEED)
            elif kind == "sketch_target":
                cache[kind] = forvalue_ray.sketches(vm, tg, dim=DIM, seed=SEED)
            elif kind == "diagnostics":
                cache[kind] = forvalue_ray.diagnostics(vm, tr)
        return cache[kind]

    return get


def _ids(rows):
    return [r["id"] for r in rows]


def _verify_ok(out):
    rc, stdout, _ = cli("verify", out)
    assert rc == 0, stdout
    return json.loads(stdout.strip().splitlines()[-1])


# ---- equality with the core API -------------------------------------------------------------------------------


def test_value_mean_equals_core_api(data, run_a, core):
    ids = _ids(data.train_rows)
    assert sorted(run_a.scores) == sorted(ids)
    assert rel_err(as_matrix(run_a.scores, ids)[:, 0], core("mean")) < 1e-5
    assert target_ids(run_a.out) == ["mean"]
    diag = core("diagnostics")
    n_tokens, nll = read_column(run_a.out, "scores", "n_tokens"), read_column(run_a.out, "scores", "nll")
    assert [n_tokens[i] for i in ids] == diag["n_tokens"].tolist()
    assert rel_err([nll[i] for i in ids], diag["nll"]) < 1e-5
    run = json.loads((run_a.out / "run.json").read_text())
    assert run["counts"] == {"rows_read": 96, "scored": 96, "rejected": 0, "tokens": int(diag["n_tokens"].sum()),
                             "truncated_rows": 0, "truncated_tokens": 0, "shards": N_SHARDS}
    # --dtype auto: a float32 checkpoint stays float32 on any CPU, and run.json says why
    assert run["model"]["dtype"] == "float32" and run["model"]["dtype_reason"] == "weights stored in float32: kept " \
        "at full precision"
    assert len(list((run_a.out / "scores").glob("*.parquet"))) == N_SHARDS
    assert (run_a.out / "target" / "target_stats.safetensors").exists()


def test_killed_model_actor_is_replaced_and_its_shard_redone(data, run_a, run_b, core):
    """FORVALUE_FAULT_EXIT_ONCE (``forvalue_ray.testing.faults``): an actor died (os._exit) between a shard's
    rejected and scores parts; that shard is redone in a second pass, and run.json says so."""
    assert run_a.fault_fired, "the fault hook never fired: no model actor was killed"
    inv = json.loads((run_a.out / "run.json").read_text())["this_invocation"]
    assert len(inv["retried_shards"]) >= 1 and inv["nodes_lost"] == [], inv
    assert _verify_ok(run_a.out)["scored"] == 96
    ids = _ids(data.train_rows)
    np.testing.assert_allclose(as_matrix(run_a.scores, ids), as_matrix(run_b.scores, ids), rtol=1e-6, atol=0)
    assert rel_err(as_matrix(run_a.scores, ids)[:, 0], core("mean")) < 1e-5


def test_one_and_three_actors_give_bit_identical_stats_and_scores(data, run_a, run_b):
    """Target partials are per fixed block and reduced in float64 in block order: the number of actors never
    changes a result (--num-actors is an execution setting)."""
    ids = _ids(data.train_rows)
    assert sorted(run_b.scores) == sorted(run_a.scores)
    stats = [(r.out / "target" / "target_stats.safetensors").read_bytes() for r in (run_a, run_b)]
    assert stats[0] == stats[1]
    np.testing.assert_array_equal(as_matrix(run_b.scores, ids), as_matrix(run_a.scores, ids))
    _verify_ok(run_b.out)


def test_value_normalize_equals_core_api(data, rerun_b, core):
    assert rerun_b.overwrite_rc == 0, rerun_b.overwrite_err[-3000:]
    ids = _ids(data.train_rows)
    assert rel_err(as_matrix(rerun_b.normalized, ids)[:, 0], core("normalize")) < 1e-5
    assert np.all(np.abs(as_matrix(rerun_b.normalized, ids)) <= 1 + 1e-6)  # cosine


def test_value_groups_equals_core_api(data, ray_local, core):
    out = data.root / "groups"
    run_ok(*data.value_args(out, "--mode", "groups", "--group-column", "class"))
    names, expected = core("groups")
    assert target_ids(out) == names == ["0", "1", "2"]
    got = read_scores(out)
    ids = _ids(data.train_rows)
    assert sorted(got) == sorted(ids)
    assert rel_err(as_matrix(got, ids), expected) < 1e-5
    _verify_ok(out)


def test_value_pairwise_equals_core_api(data, ray_local, core):
    out = data.root / "pairwise"
    run_ok(*data.value_args(out, "--mode", "pairwise", "--num-actors", "2"))
    assert target_ids(out) == _ids(data.target_rows)
    got = read_scores(out)
    ids = _ids(data.train_rows)
    values, embed = core("pairwise")
    assert rel_err(as_matrix(got, ids), values) < 1e-5
    table = fio.read_parts(str(out / "scores"), ["id", "embed"])
    got_embed = dict(zip(table["id"].to_pylist(), table["embed"].to_pylist()))
    assert rel_err(as_matrix(got_embed, ids), embed) < 1e-5  # the embedding cosine from the same forward
    _verify_ok(out)


def test_truncation_is_counted_in_run_json_and_on_the_console(data, ray_local, vm):
    out = data.root / "truncated"
    err = run_ok(*data.value_args(out, "--max-length", "40", "--form", "text"))  # every cut row keeps valued tokens
    full = [len(e.input_ids) for e in forvalue_ray.encode_rows(vm, data.train_rows, max_length=10**6, form="text")]
    cut = [n - 40 for n in full if n > 40]
    assert cut, "the test needs rows longer than 40 tokens"
    counts = json.loads((out / "run.json").read_text())["counts"]
    assert (counts["truncated_rows"], counts["truncated_tokens"]) == (len(cut), sum(cut))
    assert f"{len(cut):,} rows truncated at max_length, {sum(cut):,} tokens dropped" in err


def test_driver_never_holds_target_statistics(data, ray_local, monkeypatch):
    """Partials are reduced among Ray tasks, the artifact saved by a worker and broadcast by reference: no
    ray.get on the driver returns statistics or a partial ([K, V, d] at 8B is 2.1 GB per group)."""
    import ray

    real_get, fetched = ray.get, []

    def spy(refs, *args, **kwargs):
        out = real_get(refs, *args, **kwargs)
        for value in out if isinstance(out, list) else [out]:
            fetched.append(type(value).__name__)
            assert not (isinstance(value, dict) and {"stats", "reference"} & set(value)), "statistics on the driver"
            assert not (isinstance(value, tuple) and value and hasattr(value[0], "shape")), "a partial on the driver"
        return out

    monkeypatch.setattr(ray, "get", spy)
    out = data.root / "driver-memory"
    run_ok(*data.value_args(out, "--mode", "groups", "--group-column", "class", "--num-actors", "2"))
    assert (out / "target" / "target_stats.safetensors").exists()


def test_groups_empty_name_kept_and_fully_rejected_group_reported(data, ray_local, vm):
    """A group named "" is its own group (not merged into "mean"); a group whose target rows were all
    rejected is named in run.json and on the console, and the other groups are scored."""
    rows = data.target_rows
    targets = ([{**r, "class": ""} for r in rows[:2]] + [{**r, "class": "kept"} for r in rows[2:4]]
               + [{**r, "class": "broken", "text": "   "} for r in rows[4:]])
    path = write_parquet([{"id": r["id"], "text": r["text"], "class": r["class"]} for r in targets],
                         data.root / "target-groups.parquet")
    out = data.root / "groups-edge"
    args = [a if a != data.target else path for a in data.value_args(out, "--mode", "groups", "--group-column",
                                                                       "class", "--form", "text")]
    err = run_ok(*args)
    assert target_ids(out) == ["", "kept"]
    run = json.loads((out / "run.json").read_text())
    assert run["target_groups_without_rows"] == ["broken"] and run["target_rejected"] == len(rows) - 4
    assert "broken" in err and "no valid row" in err
    names, expected = forvalue_ray.group_scores(vm, data.train_rows, targets[:4], ["", "", "kept", "kept"],
                                                form="text")
    assert names == ["", "kept"]
    ids = _ids(data.train_rows)
    assert rel_err(as_matrix(read_scores(out), ids), expected) < 1e-5


@pytest.fixture(scope="module")
def sketch_runs(data, ray_local):
    s_train, s_target = data.root / "sketch-train", data.root / "sketch-target"
    common = ["--model", data.model, "--dim", DIM, "--seed", SEED, "--shard-rows", SHARD_ROWS, "--no-progress",
              "--storage", "float32", "--center", "0"]  # a raw float32 index: the core API's sketches as they are
    run_ok("sketch", "--data", data.train, "--out", s_train, *common)
    run_ok("sketch", "--data", data.target, "--out", s_target, "--group-column", "class", *common)
    return s_train, s_target


def _sketch_matrix(out, ids):
    sketches = read_column(out, "sketches", "sketch")
    return np.asarray([sketches[i] for i in ids], dtype=np.float64)


def test_sketch_equals_core_api(data, sketch_runs, core):
    s_train, s_target = sketch_runs
    for out, rows, kind in ((s_train, data.train_rows, "sketch_train"), (s_target, data.target_rows, "sketch_target")):
        ids = _ids(rows)
        table = fio.read_parts(str(out / "sketches"))
        assert sorted(table["id"].to_pylist()) == sorted(ids)
        assert pa.types.is_fixed_size_list(table.schema.field("sketch").type)
        assert table.schema.field("sketch").type.list_size == DIM
        assert rel_err(_sketch_matrix(out, ids), core(kind)) < 1e-5
        index = json.loads((out / "index.json").read_text())
        assert (index["dim"], index["seed"]) == (DIM, SEED)
        _verify_ok(out)
    groups = read_column(s_target, "sketches", "class")
    assert groups == {r["id"]: str(r["class"]) for r in data.target_rows}


def test_score_equals_inner_products_of_sketches(data, sketch_runs, ray_local):
    s_train, s_target = sketch_runs
    train_ids, target_row_ids = _ids(data.train_rows), _ids(data.target_rows)
    x, t = _sketch_matrix(s_train, train_ids), _sketch_matrix(s_target, target_row_ids)
    for mode, expected, names in (("mean", x @ t.mean(0)[:, None], ["mean"]),
                                  ("pairwise", x @ t.T, target_row_ids)):
        out = data.root / f"score-{mode}"
        run_ok("score", "--index", s_train, "--target-index", s_target, "--out", out, "--mode", mode,
               "--shard-rows", SHARD_ROWS, "--no-progress")
        assert target_ids(out) == names
        got = read_scores(out)
        assert sorted(got) == sorted(train_ids)
        assert rel_err(as_matrix(got, train_ids), expected) < 1e-5
        _verify_ok(out)


def test_int8_index_scores_its_restored_sketches_and_any_target_storage(data, sketch_runs, ray_local, core):
    """--storage int8: each stored row is within one rounding step of the core API's float sketch, and score
    computes exactly the inner products of the restored sketches, with an int8 or a float32 target index."""
    from forvalue_ray.sketch import restore_sketches

    common = ["--model", data.model, "--dim", DIM, "--seed", SEED, "--shard-rows", SHARD_ROWS, "--no-progress",
              "--storage", "int8", "--center", "0"]
    s_train, s_target = data.root / "int8-train", data.root / "int8-target"
    run_ok("sketch", "--data", data.train, "--out", s_train, *common)
    run_ok("sketch", "--data", data.target, "--out", s_target, *common)
    assert json.loads((s_train / "index.json").read_text())["storage"] == "int8"
    restored = {}
    for out, rows, kind in ((s_train, data.train_rows, "sketch_train"), (s_target, data.target_rows, "sketch_target")):
        table = fio.read_parts(str(out / "sketches"))
        assert table.schema.field("sketch").type.value_type == pa.int8()
        order = {i: k for k, i in enumerate(table["id"].to_pylist())}
        ids = _ids(rows)
        values = np.stack(table["sketch"].to_numpy(zero_copy_only=False))[[order[i] for i in ids]]
        scale = table["sketch_scale"].to_numpy()[[order[i] for i in ids]]
        restored[kind] = restore_sketches(values, scale)
        assert np.all(np.abs(restored[kind] - core(kind)) <= scale[:, None] * 1.001)
    train_ids = _ids(data.train_rows)
    out = data.root / "score-int8"
    run_ok("score", "--index", s_train, "--target-index", s_target, "--out", out, "--shard-rows", SHARD_ROWS,
           "--no-progress")
    expected = restored["sketch_train"] @ restored["sketch_target"].mean(0)[:, None]
    assert rel_err(as_matrix(read_scores(out), train_ids), expected) < 1e-5
    out = data.root / "score-mixed"
    run_ok("score", "--index", s_train, "--target-index", sketch_runs[1], "--out", out, "--no-progress")
    expected = restored["sketch_train"] @ core("sketch_target").mean(0)[:, None]
    assert rel_err(as_matrix(read_scores(out), train_ids), expected) < 1e-5


def test_binary_index_stores_rotated_signs_and_scores_them_against_a_float32_target(data, sketch_runs, ray_local,
                                                                                     core):
    """--storage binary: a row is its rotated sketch's signs (8 to a byte) with s = ‖x‖²/‖Rx‖₁ and ‖x‖ from the
    core API's float sketch; score against a float32 target index computes the restored rows' inner products, and
    the cosine divides by the stored norms."""
    from forvalue_ray.sketch import restore_sketches, rotate

    s_train = data.root / "binary-train"
    run_ok("sketch", "--data", data.train, "--out", s_train, "--model", data.model, "--dim", DIM, "--seed", SEED,
           "--shard-rows", SHARD_ROWS, "--no-progress", "--storage", "binary", "--center", "0")
    table = fio.read_parts(str(s_train / "sketches"))
    assert table.schema.field("sketch").type.value_type == pa.uint8() and table.schema.field("sketch").type.list_size == DIM // 8
    order = {i: k for k, i in enumerate(table["id"].to_pylist())}
    train_ids = _ids(data.train_rows)
    pick = [order[i] for i in train_ids]
    packed = np.stack(table["sketch"].to_numpy(zero_copy_only=False))[pick]
    scale = np.stack([table["sketch_scale"].to_numpy(), table["sketch_norm"].to_numpy()], 1)[pick]
    rotated = rotate(core("sketch_train"))
    signs = np.unpackbits(packed, axis=1) * 2 - 1.0
    clear = np.abs(rotated) > 1e-4 * np.abs(rotated).max(1, keepdims=True)  # a sign at ~0 may go either way
    assert np.array_equal(signs[clear], np.sign(rotated)[clear])
    np.testing.assert_allclose(scale[:, 1], np.linalg.norm(rotated, axis=1), rtol=1e-5)
    np.testing.assert_allclose(scale[:, 0], (rotated ** 2).sum(1) / np.abs(rotated).sum(1), rtol=1e-5)
    x, t = restore_sketches(packed, scale), core("sketch_target")
    for extra, expected in (([], x @ t.mean(0)[:, None]),
                            (["--normalize"], (x / scale[:, 1:]) @ (t / np.linalg.norm(t, axis=1, keepdims=True))
                             .mean(0)[:, None])):
        out = data.root / f"score-binary{'-'.join(extra)}"
        run_ok("score", "--index", s_train, "--target-index", sketch_runs[1], "--out", out, "--no-progress", *extra)
        assert rel_err(as_matrix(read_scores(out), train_ids), expected) < 1e-5
        _verify_ok(out)
    # an index from before the two-round rotation records none: its signs restore as other numbers, so it is refused
    meta_path = s_train / "index.json"
    meta = json.loads(meta_path.read_text())
    assert meta["rotation"] == "hartley-2"
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "rotation"}))
    rc, _, err = cli("score", "--index", s_train, "--target-index", sketch_runs[1], "--out", data.root / "score-old",
                     "--no-progress")
    assert rc != 0 and "earlier forvalue-ray" in err and "rebuild it with `forvalue-ray sketch --storage binary" in err
    assert not (data.root / "score-old" / "scores").exists()


def test_centered_int8_index_is_the_core_estimate_and_refuses_a_raw_partner(data, sketch_runs, ray_local, vm):
    """sketch --center N: the index rows are the core API's centered sketches (int8: within one rounding step) with
    its exact ⟨G, μ⟩; a target index built with --center-stats shares μ's identity; score applies
    ⟨c, c'⟩ + a + a' − ‖μ‖² (checked against that formula written out); raw and centered indexes do not mix."""
    from forvalue_ray.artifacts import load_target_stats
    from forvalue_ray.sketch import restore_sketches

    common = ["--model", data.model, "--dim", DIM, "--seed", SEED, "--shard-rows", SHARD_ROWS, "--no-progress",
              "--storage", "int8"]
    s_train, s_target = data.root / "centered-train", data.root / "centered-target"
    run_ok("sketch", "--data", data.train, "--out", s_train, "--center", "40", "--center-seed", "2", *common)
    run_ok("sketch", "--data", data.target, "--out", s_target, "--center-stats", s_train / "center",
           "--group-column", "class", *common)
    meta, tmeta = (json.loads((o / "index.json").read_text()) for o in (s_train, s_target))
    assert meta["center_id"] and meta["center_id"] == tmeta["center_id"] and meta["center"]["rows"] == 40
    mu = load_target_stats(str(s_train / "center"))
    assert mu.counts == [40]
    stored = []
    for out, rows in ((s_train, data.train_rows), (s_target, data.target_rows)):
        expected = forvalue_ray.centered_sketches(vm, rows, mu, dim=DIM, seed=SEED)
        table = fio.read_parts(str(out / "sketches"))
        order = {i: k for k, i in enumerate(table["id"].to_pylist())}
        pick = [order[i] for i in _ids(rows)]
        scale = table["sketch_scale"].to_numpy()[pick]
        x = restore_sketches(np.stack(table["sketch"].to_numpy(zero_copy_only=False))[pick], scale)
        a = table["center_dot"].to_numpy()[pick]
        assert np.all(np.abs(x - expected.sketch) <= scale[:, None] * 1.001)
        assert rel_err(a, expected.center_dot) < 1e-6
        assert meta["center"]["sq_norm"] == pytest.approx(expected.center_sq_norm, rel=1e-9)
        stored.append((x, a))
        _verify_ok(out)
    (x, a), (t, b) = stored
    classes = np.array([str(r["class"]) for r in data.target_rows])
    names = sorted(set(classes))
    m = meta["center"]["sq_norm"]
    expected = np.stack([x @ t[classes == k].mean(0) + a + b[classes == k].mean() - m for k in names], axis=1)
    out = data.root / "score-centered"
    run_ok("score", "--index", s_train, "--target-index", s_target, "--out", out, "--mode", "groups",
           "--group-column", "class", "--shard-rows", SHARD_ROWS, "--no-progress")
    assert target_ids(out) == names
    assert rel_err(as_matrix(read_scores(out), _ids(data.train_rows)), expected) < 1e-5
    _verify_ok(out)
    rc, _, err = cli("score", "--index", s_train, "--target-index", sketch_runs[1], "--out", data.root / "mixed-1",
                     "--no-progress")
    assert rc != 0 and f"--center-stats {s_train / 'center'}" in err, err[-2000:]
    rc, _, err = cli("score", "--index", sketch_runs[0], "--target-index", s_target, "--out", data.root / "mixed-2",
                     "--no-progress")
    assert rc != 0 and "is centered" in err and "is raw (built with --center 0)" in err, err[-2000:]


# ---- bad rows -------------------------------------------------------------------------------------------------


BAD_LINES = [
    ('{"id": "good-1", "text": "the cat sat on the mat"}', None),
    ('{"id": "good-2", "prompt": "Q: 2+2?", "response": " A: 4"}', None),
    ('{"id": "empty", "text": ""}', "column 'text' is empty"),
    ('{"id": "blank", "text": "   \\t  "}', "column 'text' is empty"),
    ('{"id": "int-text", "text": 12345}', "column 'text' must be a string, got int"),
    ('{"id": "broken", "text": "no closing quote}', "malformed JSON line"),
    ('{"id": "no-column", "body": "some text"}', "row has none of the columns"),
    ('{"id": "prompt-only", "prompt": "Q: where is the answer?"}', "needs both 'prompt' and 'response'"),
    ('{"id": "too-long", "text": "' + "z" * 120 + '"}', "over-long: 121 tokens > max_length 48"),
    ('{"id": "good-1", "text": "a second row with the first id"}', "duplicate id"),
    ('[1, 2, 3]', "is a list, not an object"),
    ('{"id": "good-3", "text": "zebras and cats"}', None),
]
SHORT_TARGET = [{"id": "t1", "text": "a cat on a mat"}, {"id": "t2", "prompt": "Q: 3+3?", "response": " A: 6"}]


@pytest.fixture(scope="module")
def bad_run(data, ray_local):
    path = data.root / "bad.jsonl"
    path.write_text("".join(line + "\n" for line, _ in BAD_LINES))
    target = write_jsonl(SHORT_TARGET, data.root / "short-target.jsonl")
    out = data.root / "bad-out"
    run_ok("value", "--model", data.model, "--train", path, "--target", target, "--out", out,
           "--overlong", "reject", "--max-length", "48", "--no-progress")
    return SimpleNamespace(path=path, out=out)


def _expected_rejections(path: Path) -> dict:
    """id → expected reason substring; a row without a parsable id gets ``bad.jsonl@<byte offset>``."""
    expected, offset = [], 0
    for line, reason in BAD_LINES:
        if reason is not None:
            try:
                rid = json.loads(line)["id"]
            except (ValueError, TypeError):
                rid = f"{path.name}@{offset}"
            expected.append((rid, reason))
        offset += len(line.encode()) + 1
    return expected


def test_bad_rows_are_rejected_with_reasons(bad_run, vm):
    out = bad_run.out
    rej = fio.read_parts(str(out / "rejected"))
    got = sorted(zip(rej["id"].to_pylist(), rej["reason"].to_pylist()))
    expected = sorted(_expected_rejections(bad_run.path))
    assert [g[0] for g in got] == [e[0] for e in expected]
    for (rid, reason), (_, want) in zip(got, expected):
        assert want in reason, (rid, reason, want)
    good = [json.loads(line) for line, reason in BAD_LINES if reason is None]
    scores = read_scores(out)
    assert sorted(scores) == sorted(r["id"] for r in good)
    want = forvalue_ray.value_scores(vm, good, SHORT_TARGET, max_length=48, overlong="reject")
    assert rel_err([scores[r["id"]] for r in good], want) < 1e-5
    run = json.loads((out / "run.json").read_text())
    assert (run["target_rows"], run["target_rejected"]) == (2, 0)
    counts = run["counts"]
    n_tokens = forvalue_ray.diagnostics(vm, good)["n_tokens"]
    assert counts == {"rows_read": len(BAD_LINES), "scored": len(good), "rejected": len(expected),
                      "tokens": int(n_tokens.sum()), "truncated_rows": 0, "truncated_tokens": 0, "shards": 1}
    problems, _ = verification.verify(str(out))
    assert not problems  # the in-shard duplicate id is rejected, and that is not a second appearance


def test_verify_accepts_a_rejected_duplicate_id(bad_run):
    assert cli("verify", bad_run.out)[0] == 0


def test_select_writes_only_scored_rows(bad_run, data):
    sel = data.root / "sel-bad"
    run_ok("select", "--scores", bad_run.out, "--data", bad_run.path, "--out", sel, "--top-fraction", "1.0")
    written = [json.loads(line) for f in sorted(sel.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in written) == ["good-1", "good-2", "good-3"]
    assert {"id": "good-1", "text": "the cat sat on the mat"} in written


# ---- re-runs: continue, refuse a different job, overwrite -----------------------------------------------------


def test_rerun_of_a_finished_job_is_a_noop(run_b, rerun_b):
    assert rerun_b.noop_rc == 0, rerun_b.noop_err[-3000:]
    assert rerun_b.noop_run["this_invocation"]["shards"] == 0
    assert rerun_b.noop_run["counts"]["scored"] == 96
    assert rerun_b.noop_parts == run_b.parts  # byte for byte: nothing rewritten
    record, shards, before = rerun_b.plan_after_noop  # the older plan was recognised and rewritten in today's form
    assert "shards" not in record and record["shard_count"] == N_SHARDS and shards == before


def test_different_job_into_same_out_needs_overwrite(run_b, rerun_b):
    for rc, err, changed in ((rerun_b.max_length_rc, rerun_b.max_length_err, "max_length"),
                             (rerun_b.target_rc, rerun_b.target_err, "target")):
        assert rc == 2, err[-2000:]
        assert "--overwrite" in err and changed in err, err[-2000:]
    assert rerun_b.parts_after_refusals == run_b.parts  # a refused job touches nothing
    assert rerun_b.overwrite_rc == 0, rerun_b.overwrite_err[-3000:]
    assert rerun_b.plan["settings"]["normalize"] is True
    assert rerun_b.verify_after_overwrite[0] == 0, rerun_b.verify_after_overwrite[1]


def test_resume_removes_stale_temp_files(rerun_b):
    assert not rerun_b.stale_left
    assert rerun_b.verify_after_noop[0] == 0, rerun_b.verify_after_noop[1]


# ---- a killed driver, resumed ---------------------------------------------------------------------------------


def _finished_parts(out: Path) -> int:
    d = out / "scores"
    return len([f for f in os.listdir(d) if f.endswith(".parquet") and not f.startswith(".")]) if d.is_dir() else 0


def test_driver_killed_mid_run_then_resumed(data, run_a, ray_local):
    """The CLI in its own process group with its own local Ray: SIGKILL the group once 2 of 12 parts exist,
    check nothing of that Ray survives, re-run the same command to completion, compare with run A."""
    out = data.root / "killed"
    args = data.value_args(out, "--num-actors", "1")
    log = open(data.root / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "forvalue_ray.cli", *map(str, args)], cwd=REPO, env=child_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    family = []
    try:
        deadline = time.time() + 300
        while _finished_parts(out) < 2:
            assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before it could be killed: " \
                                        f"{(data.root / 'killed.log').read_text()[-3000:]}"
            assert time.time() < deadline, "no 2 finished parts after 300 s"
            if not family and _finished_parts(out) >= 1:  # the job's processes, taken before the kill window
                family = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    # Ray's workers run in process groups of their own (same session): they must die with their raylet
    def survivors():
        in_session = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == proc.pid:
                    in_session.append(p)
            except (OSError, psutil.Error):
                pass
        return [p for p in {q.pid: q for q in family + in_session}.values()
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    deadline, alive = time.time() + 60, survivors()
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = survivors()
    stray = [(p.pid, p.name()) for p in alive]
    for p in alive:  # ours: clean up before failing
        p.kill()
    assert not stray, f"processes of the killed job's Ray survived: {stray}"
    n_done = _finished_parts(out)  # (an actor may finish a queued shard before it notices its raylet is gone)
    assert 2 <= n_done < N_SHARDS, f"{n_done} of {N_SHARDS} parts after the kill: nothing left to resume"
    assert cli("verify", out)[0] == 1  # unfinished

    err = run_ok(*args)  # the same command, in this process (the module's Ray)
    run = json.loads((out / "run.json").read_text())
    assert run["this_invocation"]["shards"] == N_SHARDS - n_done, err[-2000:]
    assert run["counts"]["scored"] == 96
    _verify_ok(out)
    got = read_scores(out)
    assert sorted(got) == sorted(run_a.scores)
    ids = sorted(got)
    # same shards, same batches as the uninterrupted run A: the same numbers
    np.testing.assert_allclose(as_matrix(got, ids), as_matrix(run_a.scores, ids), rtol=1e-12, atol=0)


# ---- verify catches problems ----------------------------------------------------------------------------------


def test_verify_reports_missing_and_extra_parts(run_a, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(run_a.out, work)
    assert cli("verify", work)[0] == 0
    parts = sorted((work / "scores").glob("*.parquet"))

    moved = tmp_path / "aside.parquet"
    shutil.move(parts[3], moved)
    rc, stdout, _ = cli("verify", work)
    assert rc == 1
    assert f"1 of {N_SHARDS} shards have no scores part" in stdout and parts[3].stem in stdout, stdout
    shutil.move(moved, parts[3])

    shutil.copy(parts[0], work / "scores" / "999999-deadbeef.parquet")  # a part of no planned shard
    rc, stdout, _ = cli("verify", work)
    assert rc == 1 and "1 parts belong to no planned shard (first: 999999-deadbeef)" in stdout, stdout
    (work / "scores" / "999999-deadbeef.parquet").unlink()

    shutil.copy(parts[0], parts[1])  # shard 0's rows under shard 1's name: shard 0's ids twice
    rc, stdout, _ = cli("verify", work)
    assert rc == 1 and f"{SHARD_ROWS} ids are scored more than once" in stdout, stdout


# ---- select ---------------------------------------------------------------------------------------------------


def _expected_selection(scores: dict, rows: list[dict], *, k=None, fraction=None, bottom=False, per_group=None):
    groups = {}
    for r in rows:
        groups.setdefault(r[per_group] if per_group else None, []).append(r["id"])
    chosen = set()
    for ids in groups.values():
        order = sorted(ids, key=lambda i: (-scores[i], i))
        if bottom:
            order = order[::-1]
        n = k if k is not None else int(round(fraction * len(order)))
        chosen.update(order[:n])
    return chosen


def _read_selection(sel: Path, fmt: str) -> list[dict]:
    if fmt == "jsonl":
        return [json.loads(line) for f in sorted(sel.glob("*.jsonl")) for line in f.read_text().splitlines()]
    files = [f for f in sorted(sel.glob("*.parquet")) if not f.name.startswith("_")]
    return [r for f in files for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def run_jsonl(data, ray_local):
    """mean mode over the JSONL copy of the training rows, in byte-range shards."""
    out = data.root / "jsonl"
    args = [a if a != data.train else data.train_jsonl for a in data.value_args(out, "--shard-bytes", "3000")]
    run_ok(*args)
    return SimpleNamespace(out=out, scores=read_scores(out))


def _ranking(sel: Path) -> list[dict]:
    return pq.read_table(sel / "_selection").to_pylist()


@pytest.mark.parametrize("fmt,flags,kw", [
    ("parquet", ["--top-k", "5", "--per-group", "class"], dict(k=5, per_group="class")),
    ("parquet", ["--bottom-fraction", "0.25"], dict(fraction=0.25, bottom=True)),
    ("jsonl", ["--top-fraction", "0.25"], dict(fraction=0.25)),
    ("jsonl", ["--bottom-fraction", "0.125", "--per-group", "class"], dict(fraction=0.125, bottom=True,
                                                                           per_group="class")),
], ids=["parquet-topk-per-group", "parquet-bottom", "jsonl-top", "jsonl-bottom-per-group"])
def test_select_writes_the_chosen_rows_in_the_input_format(data, run_a, run_jsonl, tmp_path, fmt, flags, kw):
    run = run_a if fmt == "parquet" else run_jsonl
    src = data.train if fmt == "parquet" else data.train_jsonl
    sel = tmp_path / "sel"
    rc, stdout, err = cli("select", "--scores", run.out, "--data", src, "--out", sel, *flags)
    assert rc == 0, err
    want = _expected_selection(run.scores, data.train_rows, **kw)
    res = json.loads(stdout.strip().splitlines()[-1])
    tokens = read_column(run.out, "scores", "n_tokens")
    assert res == {"selected": len(want), "written": len(want), "scored": 96, "tokens": sum(tokens[i] for i in want)}
    rows = _read_selection(sel, fmt)
    assert sorted(r["id"] for r in rows) == sorted(want)
    by_id = {r["id"]: r for r in data.train_rows}
    assert all(r == by_id[r["id"]] for r in rows)  # every column unchanged, types included
    if fmt == "parquet":
        files = [f for f in sel.glob("*.parquet") if not f.name.startswith("_")]
        assert files and all(pq.read_schema(f).remove_metadata() ==
                             pq.read_schema(data.train).remove_metadata() for f in files)
    else:
        assert not [f for f in sel.glob("*.parquet") if not f.name.startswith("_")]
    ranking = _ranking(sel)
    assert sorted(r["id"] for r in ranking) == sorted(want)
    assert all(r["score"] == run.scores[r["id"]] for r in ranking)
    # the same selection again: a no-op that changes nothing; a different one into the same --out is refused
    before = {f: f.read_bytes() for f in sel.rglob("*") if f.is_file()}
    assert cli("select", "--scores", run.out, "--out", sel, *flags)[0] == 0  # --data defaults to the scored input
    assert {f: f.read_bytes() for f in sel.rglob("*") if f.is_file()} == before
    assert cli("select", "--scores", run.out, "--data", src, "--out", sel, "--top-k", "3")[0] == 2


def test_select_cut_refined_over_many_rounds_equals_a_full_sort(data, run_a, tmp_path, monkeypatch):
    """Tiny histograms (4 bins, at most 3 candidate rows) force several distributed refinement rounds and a
    tie-break by id; the selected set is still exactly a full sort's. Then a killed-then-resumed selection:
    shards whose parts are gone are redone, identically."""
    monkeypatch.setattr(selection, "CUT_BINS", 4)
    monkeypatch.setattr(selection, "CUT_CANDIDATES", 3)
    sel = tmp_path / "sel"
    run_ok("select", "--scores", run_a.out, "--out", sel, "--top-fraction", "0.7")
    want = _expected_selection(run_a.scores, data.train_rows, fraction=0.7)
    assert sorted(r["id"] for r in _ranking(sel)) == sorted(want)
    before = {f: f.read_bytes() for f in sel.rglob("*") if f.is_file()}
    parts = sorted((sel / "_selection").glob("*.parquet"))
    for p in parts[:3]:  # as if the job died before these shards committed
        key = p.stem
        p.unlink()
        for f in sel.glob(f"*-{key}.parquet"):
            f.unlink()
    run_ok("select", "--scores", run_a.out, "--out", sel, "--top-fraction", "0.7")
    assert {f: f.read_bytes() for f in sel.rglob("*") if f.is_file()} == before


def test_select_refuses_other_data(data, run_a, tmp_path):
    rc, _, err = cli("select", "--scores", run_a.out, "--data", data.train_jsonl, "--out", tmp_path / "x",
                     "--top-k", "1")
    assert rc == 2 and "is not the data" in err
