"""`select` on a real local Ray over real score outputs of the tiny model (groups and pairwise mode, several shards,
ties): the distributed selection equals the full-sort reference `selected_ids` for --budget-tokens and --combine;
the reference itself equals the literal definitions; and what `select` refuses (an --out that is not a selection,
or is/holds/lies in what it reads, a missing group column, incomplete scores) or keeps (every column's type).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from forvalue_ray import io as fio
from forvalue_ray.sample_data import sentence_task
from forvalue_ray.job import parts, selection
from jobtools import cli, local_ray, run_ok, save_tiny_model, write_parquet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SHARD_ROWS = 8
NULL_SHARD = 1  # the int64 column `weight` is null in every row of this shard


# ---- the reference against the literal definitions (no Ray) ---------------------------------------------------------


def _table(mat: np.ndarray, ids: list[str], tokens: np.ndarray) -> pa.Table:
    return pa.table({"id": ids, "scores": pa.array(list(mat.astype(np.float64)), pa.list_(pa.float64())),
                     "n_tokens": pa.array(tokens, pa.int64())})


def _interleaved(mat: np.ndarray, ids: list[str]) -> list[str]:
    """Round-robin by its definition: target 0's best, target 1's best, ..., then every target's second best, ...,
    a row kept where it first appears (each ranking: score desc, ties by id asc)."""
    rankings = [sorted(range(len(ids)), key=lambda i: (-mat[i, t], ids[i])) for t in range(mat.shape[1])]
    seq, seen = [], set()
    for r in range(len(ids)):
        for ranking in rankings:
            if ranking[r] not in seen:
                seen.add(ranking[r])
                seq.append(ids[ranking[r]])
    return seq


def _prefix_within(seq: list[str], tokens: dict, budget: int) -> list[str]:
    out, total = [], 0
    for rid in seq:
        if total + tokens[rid] > budget:
            break
        total += tokens[rid]
        out.append(rid)
    return out


def test_reference_round_robin_and_budget_follow_their_definitions():
    rng = np.random.default_rng(7)
    n, k_targets = 37, 5
    mat = rng.integers(0, 4, (n, k_targets)).astype(float)  # many ties
    ids = [f"r{i:02d}" for i in rng.permutation(n)]
    tokens = rng.integers(0, 9, n)
    tok = dict(zip(ids, tokens.tolist()))
    table = _table(mat, ids, tokens)
    seq = _interleaved(mat, ids)
    assert sorted(seq) == sorted(ids)
    for k in (0, 1, 4, 5, 6, 17, 36, 37, 40):
        got = selection.selected_ids(table, top_k=k, combine="round-robin")
        assert set(got) == set(seq[:k]), k
        assert all(got[i] == mat[ids.index(i)].max() for i in got)
    for budget in (0, 3, 40, 100, int(tokens.sum()) - 1, int(tokens.sum())):
        assert set(selection.selected_ids(table, budget_tokens=budget, combine="round-robin")) == \
            set(_prefix_within(seq, tok, budget)), budget
        by_max = sorted(ids, key=lambda i: (-mat[ids.index(i)].max(), i))
        assert set(selection.selected_ids(table, budget_tokens=budget, combine="max")) == \
            set(_prefix_within(by_max, tok, budget)), budget
        by_mean = sorted(ids, key=lambda i: (-mat[ids.index(i)].mean(), i))
        assert set(selection.selected_ids(table, budget_tokens=budget)) == set(_prefix_within(by_mean, tok, budget))
    groups = {i: int(i[1:]) % 3 for i in ids}  # per group: each group's own interleaving
    got = selection.selected_ids(table, top_k=4, combine="round-robin", groups=groups)
    want = set()
    for g in range(3):
        members = [j for j, i in enumerate(ids) if groups[i] == g]
        want |= set(_interleaved(mat[members], [ids[j] for j in members])[:4])
    assert set(got) == want


def test_reference_ranks_by_the_embedding_or_the_sum_of_both_cosines():
    rng = np.random.default_rng(3)
    n, k_targets = 29, 4
    value, embed = rng.normal(size=(n, k_targets)), rng.normal(size=(n, k_targets))
    ids = [f"r{i:02d}" for i in rng.permutation(n)]
    table = _table(value, ids, rng.integers(1, 9, n)).append_column(
        "embed", pa.array(list(embed), pa.list_(pa.float64())))
    for by, mat in (("value", value), ("embed", embed), ("value+embed", value + embed)):
        by_mean = sorted(ids, key=lambda i: (-mat[ids.index(i)].mean(), i))
        got = selection.selected_ids(table, top_k=6, by=by)
        assert list(got) and set(got) == set(by_mean[:6]), by
        assert all(np.isclose(got[i], mat[ids.index(i)].mean()) for i in got)
        assert set(selection.selected_ids(table, top_k=6, combine="round-robin", by=by)) == \
            set(_interleaved(mat, ids)[:6]), by


# ---- data, model, Ray, runs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    train, target = sentence_task(n_classes=3, n_train_per_class=16, n_val_per_class=2)
    for i, r in enumerate(train):
        r["weight"] = None if i // SHARD_ROWS == NULL_SHARD else i
    d = SimpleNamespace(root=root, train_rows=train)
    d.model = save_tiny_model(root / "model")
    d.train = write_parquet(train, root / "train.parquet", row_group_size=SHARD_ROWS)
    assert pq.read_schema(d.train).field("weight").type == pa.int64()
    d.target = write_parquet(target, root / "target.parquet")
    d.n_shards = pq.ParquetFile(d.train).metadata.num_row_groups
    return d


@pytest.fixture(scope="module")
def ray_local(data):
    with local_ray():
        yield


def _tied_copy(src: Path, dest: Path, levels: int = 5) -> Path:
    """The run with every score rounded to a few levels (ties in every target); parts keep their schema and
    footers."""
    shutil.copytree(src, dest)
    all_scores = fio.read_parts(str(src / "scores"))["scores"].to_pylist()
    lo, hi = float(np.min(all_scores)), float(np.max(all_scores))
    for part in sorted((dest / "scores").glob("*.parquet")):
        table = pq.read_table(part)
        mat = np.asarray(table["scores"].to_pylist(), dtype=np.float64)
        rounded = lo + np.round((mat - lo) / (hi - lo) * levels) * (hi - lo) / levels
        col = pa.array(list(rounded), pa.list_(pa.float64()))
        table = table.set_column(table.column_names.index("scores"), "scores", col)
        pq.write_table(table.replace_schema_metadata(pq.read_schema(part).metadata), part)
    return dest


@pytest.fixture(scope="module")
def runs(data, ray_local):
    r = {}
    for mode, extra in (("groups", ["--group-column", "class"]), ("pairwise", [])):
        out = data.root / mode
        run_ok("value", "--model", data.model, "--train", data.train, "--target", data.target, "--out", out,
               "--shard-rows", SHARD_ROWS, "--no-progress", "--mode", mode, *extra)
        r[mode] = _tied_copy(out, data.root / f"{mode}-tied")
    return r


def _reference(run: Path, data, **kw) -> dict:
    per_group = kw.pop("per_group", None)
    groups = {r["id"]: json.dumps(r[per_group]) for r in data.train_rows} if per_group else None
    return selection.selected_ids(fio.read_parts(str(run / "scores")), groups=groups, **kw)


def _selection(sel: Path) -> dict:
    table = fio.read_parts(str(sel / "_selection"))
    return dict(zip(table["id"].to_pylist(), table["score"].to_pylist()))


def _written(sel: Path) -> pa.Table:
    return pads.dataset([str(f) for f in sorted(sel.glob("*.parquet"))]).to_table()


# ---- the distributed selection equals the reference -------------------------------------------------------------


CASES = [
    ("groups", ["--top-k", "10", "--combine", "round-robin"], dict(top_k=10, combine="round-robin")),
    ("pairwise", ["--top-fraction", "0.3", "--combine", "round-robin", "--per-group", "class"],
     dict(top_fraction=0.3, combine="round-robin", per_group="class")),
    ("pairwise", ["--top-k", "7", "--combine", "max"], dict(top_k=7, combine="max")),
    ("groups", ["--bottom-fraction", "0.25", "--combine", "max", "--per-group", "class"],
     dict(bottom_fraction=0.25, combine="max", per_group="class")),
    ("pairwise", ["--budget-tokens", "{third}"], dict(budget_tokens="{third}")),
    ("groups", ["--budget-tokens", "{third}", "--combine", "max", "--per-group", "class"],
     dict(budget_tokens="{third}", combine="max", per_group="class")),
    ("pairwise", ["--budget-tokens", "{third}", "--combine", "round-robin"],
     dict(budget_tokens="{third}", combine="round-robin")),
    ("groups", ["--budget-tokens", "{tenth}", "--combine", "round-robin", "--per-group", "class"],
     dict(budget_tokens="{tenth}", combine="round-robin", per_group="class")),
    ("pairwise", ["--top-k", "9", "--combine", "round-robin", "--by", "embed"],
     dict(top_k=9, combine="round-robin", by="embed")),
    ("pairwise", ["--budget-tokens", "{third}", "--by", "value+embed"], dict(budget_tokens="{third}", by="value+embed")),
]


@pytest.mark.parametrize("mode,flags,kw", CASES, ids=[f"{m}-{'-'.join(f[0::2]).replace('--', '')}-{i}"
                                                        for i, (m, f, _) in enumerate(CASES)])
def test_select_equals_the_full_sort(data, runs, tmp_path, monkeypatch, mode, flags, kw):
    """Small histograms (8 bins, at most 5 rows around a cut) force refinement rounds on the tied scores."""
    monkeypatch.setattr(selection, "CUT_BINS", 8)
    monkeypatch.setattr(selection, "CUT_CANDIDATES", 5)
    run = runs[mode]
    total = int(fio.read_parts(str(run / "scores"))["n_tokens"].to_numpy().sum())
    fill = {"{third}": str(total // 3), "{tenth}": str(total // 10)}
    flags = [fill.get(f, f) for f in flags]
    kw = {k: int(fill[v]) if v in fill else v for k, v in kw.items()}
    want = _reference(run, data, **kw)
    assert 0 < len(want) < len(data.train_rows)
    sel = tmp_path / "sel"
    rc, stdout, err = cli("select", "--scores", run, "--out", sel, *flags)
    assert rc == 0, err[-3000:]
    tokens = dict(zip(*fio.read_parts(str(run / "scores"), ["id", "n_tokens"]).to_pydict().values()))
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res == {"selected": len(want), "written": len(want), "scored": len(data.train_rows),
                   "tokens": sum(tokens[i] for i in want)}
    if "budget_tokens" in kw and "per_group" not in kw:  # per group: each group's own budget
        assert res["tokens"] <= kw["budget_tokens"]
    assert _selection(sel) == want  # the ids, and each row's score (round-robin: its max over targets)
    assert sorted(_written(sel)["id"].to_pylist()) == sorted(want)
    record = json.loads((sel / "_select.json").read_text())["settings"]
    assert {k: record[k] for k in kw if k != "per_group"} == {k: v for k, v in kw.items() if k != "per_group"}


# ---- refusals and what is kept ----------------------------------------------------------------------------------------


def _tree(path: Path) -> dict:
    return {f: f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_select_overwrite_replaces_only_a_selection(data, runs, tmp_path):
    run = runs["groups"]
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    rc, _, err = cli("select", "--scores", run, "--out", keep, "--top-k", "3", "--overwrite")
    assert rc == 2 and "holds no selection" in err and "even with --overwrite" in err, err
    assert (keep / "notes.txt").read_text() == "x" and len(list(keep.iterdir())) == 1
    before = _tree(data.root)
    for out in (run, run / "scores", run / "sub", data.root, data.train, data.root / "train.parquet" / "x"):
        rc, _, err = cli("select", "--scores", run, "--out", out, "--top-k", "3", "--overwrite")
        assert rc == 2 and "is, lies inside or contains the" in err, (out, err)
    assert _tree(data.root) == before  # nothing read was touched, nothing written
    # an earlier selection is replaced by a different one with --overwrite (and refused without)
    sel = tmp_path / "sel"
    run_ok("select", "--scores", run, "--out", sel, "--top-k", "3")
    assert cli("select", "--scores", run, "--out", sel, "--top-k", "5")[0] == 2
    run_ok("select", "--scores", run, "--out", sel, "--top-k", "5", "--overwrite")
    assert set(_selection(sel)) == set(_reference(run, data, top_k=5))


def test_select_keeps_every_column_type(data, runs, tmp_path):
    """An int64 column null in every row of one shard stays int64 there: the selection reads back as one dataset
    with the input's schema and values."""
    sel = tmp_path / "sel"
    run_ok("select", "--scores", runs["groups"], "--out", sel, "--top-fraction", "1.0")
    files = [f for f in sorted(sel.glob("*.parquet"))]
    assert len(files) == data.n_shards
    schema = pq.read_schema(data.train).remove_metadata()
    assert all(pq.read_schema(f).remove_metadata() == schema for f in files)
    table = _written(sel)
    assert table.schema.remove_metadata() == schema
    by_id = {r["id"]: r for r in data.train_rows}
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(by_id) and all(r == by_id[r["id"]] for r in rows)
    assert sum(r["weight"] is None for r in rows) == SHARD_ROWS


def test_select_refuses_a_group_column_missing_from_the_data(data, runs, tmp_path):
    out = tmp_path / "sel"
    rc, _, err = cli("select", "--scores", runs["groups"], "--out", out, "--top-k", "2", "--per-group", "klass")
    assert rc == 2 and "--per-group 'klass' is not a column" in err and "class" in err and "weight" in err, err
    assert not out.exists()


def test_select_by_embed_refuses_scores_without_the_embedding(data, runs, tmp_path):
    rc, _, err = cli("select", "--scores", runs["groups"], "--out", tmp_path / "sel", "--top-k", "3", "--by", "embed")
    assert rc != 0 and "--by embed" in err and "--mode pairwise" in err
    assert not (tmp_path / "sel").exists()


def test_select_refuses_incomplete_scores(data, runs, tmp_path):
    """A crashed value run (two scores parts missing): refused up front, nothing left in --out."""
    crashed = tmp_path / "crashed"
    shutil.copytree(runs["groups"], crashed)
    for part in sorted((crashed / "scores").glob("*.parquet"))[:2]:
        part.unlink()
    out = tmp_path / "sel"
    rc, _, err = cli("select", "--scores", crashed, "--out", out, "--top-k", "2")
    assert rc == 2, err
    assert f"is incomplete: 2 of {data.n_shards} shards have no scores part" in err and \
        f"forvalue-ray verify {crashed}" in err, err
    assert not out.exists()


def test_select_notes_the_raw_score_only_for_the_raw_score(data, runs, tmp_path):
    """Top rows of the paper's raw score (mean mode, no --normalize/--center) come with a note pointing to the
    measured recipe; normalized, grouped or pairwise scores, and the bottom of any score, do not."""
    raw = tmp_path / "mean"
    run_ok("value", "--model", data.model, "--train", data.train, "--target", data.target, "--out", raw,
           "--shard-rows", SHARD_ROWS, "--no-progress")
    rc, _, err = cli("select", "--scores", raw, "--out", tmp_path / "top", "--top-k", 3)
    assert rc == 0 and "raw scores" in err and "--normalize" in err
    rc, _, err = cli("select", "--scores", raw, "--out", tmp_path / "bottom", "--bottom-fraction", 0.1)
    assert rc == 0 and "raw scores" not in err
    rc, _, err = cli("select", "--scores", runs["groups"], "--out", tmp_path / "groups", "--top-k", 3)
    assert rc == 0 and "raw scores" not in err
    assert selection.raw_score_warning({"command": "value", "mode": "mean", "normalize": True}) is None
    assert selection.raw_score_warning({"command": "value", "mode": "mean", "center": 100}) is None
    assert selection.raw_score_warning({"command": "score", "mode": "mean"}) is None


# ---- prompt fit: computed per shard, and the filter select applies ------------------------------------------------


@pytest.fixture(scope="module")
def fit_run(data, ray_local):
    out = data.root / "prompt-fit"
    run_ok("value", "--model", data.model, "--train", data.train, "--target", data.target, "--out", out,
           "--shard-rows", SHARD_ROWS, "--no-progress", "--mode", "pairwise", "--normalize",
           "--prompt-fit-column", "class")
    return out


def test_prompt_fit_column_equals_the_api_on_each_shard(data, fit_run):
    """The job pairs rows within each shard: its prompt_fit equals the in-process API on that shard's rows (a
    second code path), null where a row's class is alone in its shard."""
    from forvalue_ray import load_model, prompt_fit

    table = fio.read_parts(str(fit_run / "scores"))
    got = dict(zip(table["id"].to_pylist(), table["prompt_fit"].to_pylist()))
    assert set(got) == {r["id"] for r in data.train_rows}
    vm = load_model(str(data.model), device="cpu", dtype="float32")
    for start in range(0, len(data.train_rows), SHARD_ROWS):
        rows = data.train_rows[start:start + SHARD_ROWS]
        want = prompt_fit(vm, rows, [r["class"] for r in rows])
        for r, w in zip(rows, want):
            if np.isnan(w):
                assert got[r["id"]] is None, r["id"]
            else:
                assert got[r["id"]] == pytest.approx(w, rel=1e-4, abs=1e-6), r["id"]
    assert sum(v is not None for v in got.values()) >= len(got) // 2


def test_select_min_prompt_fit_equals_the_reference(data, fit_run, tmp_path):
    """Only rows with prompt_fit >= the threshold (or none) are ranked: the distributed selection equals the full
    sort over exactly those rows."""
    table = fio.read_parts(str(fit_run / "scores"))
    fits = table["prompt_fit"].to_pylist()
    threshold = float(np.median([f for f in fits if f is not None]))
    eligible = {i for i, f in zip(table["id"].to_pylist(), fits) if f is None or f >= threshold}
    assert 0 < len(eligible) < len(fits)
    sel = tmp_path / "sel"
    run_ok("select", "--scores", fit_run, "--out", sel, "--top-k", "6", "--combine", "round-robin",
           "--min-prompt-fit", threshold)
    want = selection.selected_ids(table, top_k=6, combine="round-robin", min_prompt_fit=threshold)
    assert _selection(sel) == want and len(want) == 6 and set(want) <= eligible
    literal = table.filter(pa.array([i in eligible for i in table["id"].to_pylist()]))
    assert want == selection.selected_ids(literal, top_k=6, combine="round-robin")


def test_select_min_prompt_fit_auto_equals_the_per_class_spread(data, fit_run, tmp_path):
    """``auto``: per value of the prompt-fit column (class), rows need a fit of at least the root mean square of
    that class's negative fits, computed here by hand over all shards; the distributed selection equals the full
    sort over exactly the rows that pass (most shards have none: round-robin over empty shards), and
    _select.json lists the thresholds."""
    table = fio.read_parts(str(fit_run / "scores"))
    cls = {r["id"]: r["class"] for r in data.train_rows}
    fits = table["prompt_fit"].to_pylist()
    want_t = {}
    for c in set(cls.values()):
        neg = [f for i, f in zip(table["id"].to_pylist(), fits) if cls[i] == c and f is not None and f < 0]
        if neg:
            want_t[json.dumps(c)] = float(np.sqrt(np.mean(np.square(neg))))
    assert want_t
    eligible = {i for i, f in zip(table["id"].to_pylist(), fits)
                if f is None or f >= want_t.get(json.dumps(cls[i]), 0.0)}
    assert 1 < len(eligible) < len(fits)
    k = len(eligible) - 1  # the tiny model's fits are noise: a few rows clear their class's spread
    sel = tmp_path / "sel"
    run_ok("select", "--scores", fit_run, "--out", sel, "--top-k", k, "--combine", "round-robin",
           "--min-prompt-fit", "auto")
    record = json.loads((sel / "_select.json").read_text())
    assert record["settings"]["prompt_fit_thresholds"] == pytest.approx(want_t, rel=1e-12)
    want = selection.selected_ids(table, top_k=k, combine="round-robin", min_prompt_fit="auto", fit_keys=cls)
    assert _selection(sel) == want and len(want) == k and set(want) <= eligible
    literal = table.filter(pa.array([i in eligible for i in table["id"].to_pylist()]))
    assert want == selection.selected_ids(literal, top_k=k, combine="round-robin")


def test_select_over_shards_the_prompt_fit_empties(data, fit_run, tmp_path):
    """A threshold above every fit leaves only the rows with none: most shards rank no row. --target (a column
    other than the first) and round-robin still equal the full sort over those rows."""
    table = fio.read_parts(str(fit_run / "scores"))
    fits = [f for f in table["prompt_fit"].to_pylist() if f is not None]
    threshold = max(fits) + 1.0
    unranked = len(table) - len(fits)
    assert unranked < len(list(fit_run.glob("scores/*.parquet")))  # so at least one shard has no ranked row
    second = parts.RunOutput(str(fit_run)).load_targets()[1]
    for flags, kw in ((["--target", second], dict(target=1)), (["--combine", "round-robin"],
                                                               dict(combine="round-robin"))):
        sel = tmp_path / flags[1]
        run_ok("select", "--scores", fit_run, "--out", sel, "--top-k", 2, "--min-prompt-fit", threshold, *flags)
        want = selection.selected_ids(table, top_k=2, min_prompt_fit=threshold, **kw)
        assert _selection(sel) == want and len(want) == min(2, unranked)


def test_select_refuses_min_prompt_fit_without_the_column(data, runs, tmp_path):
    out = tmp_path / "sel"
    rc, _, err = cli("select", "--scores", runs["groups"], "--out", out, "--top-k", "2", "--min-prompt-fit", "0")
    assert rc == 2 and "has no prompt_fit column" in err and "--prompt-fit-column" in err, err
    assert not out.exists()
    with pytest.raises(SystemExit) as stop:  # argparse refuses the value before any work
        cli("select", "--scores", runs["groups"], "--out", out, "--top-k", "2", "--min-prompt-fit", "half")
    assert stop.value.code == 2
    with pytest.raises(ValueError, match="a number or 'auto', not 'half'"):
        selection.select(str(runs["groups"]), None, str(out), top_k=2, min_prompt_fit="half")


def test_prompt_fit_enters_the_plan_only_when_set():
    """Outputs written before --prompt-fit-column existed keep their fingerprint (and resume)."""
    from forvalue_ray.job import ValueConfig

    base = {"out": "o", "train": "t", "target": "g"}
    assert "prompt_fit_column" not in ValueConfig(**base).result_fields()
    assert ValueConfig(**base, prompt_fit_column="task").result_fields()["prompt_fit_column"] == "task"
