"""``forvalue-ray report``: the page a person opens. Real value outputs of the tiny model (groups with rejected
rows, pairwise) and a select output are rendered, then loaded in headless Chromium: no console error, every
figure decoded, and the top/bottom tables hold the right rows with their input text."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from forvalue_ray.report import cut, reason_category, write_report
from forvalue_ray.sample_data import sentence_task
from jobtools import as_matrix, local_ray, read_scores, run_ok, save_tiny_model, target_ids, write_parquet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TOP = 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    train, target = sentence_task(n_classes=3, n_train_per_class=10, n_val_per_class=2, seed=4)
    bad = [{"id": "empty-1", "text": "", "prompt": "", "response": "", "class": 0, "corrupted": False},
           {"id": "empty-2", "text": " ", "prompt": " ", "response": " ", "class": 1, "corrupted": False},
           dict(train[3])]  # a repeated id within its shard
    rows = train[:4] + bad + train[4:]  # the repeat lands in its original's shard (11 rows per shard)
    model = save_tiny_model(root / "model")
    train_path = write_parquet(rows, root / "train.parquet", row_group_size=11)
    target_path = write_parquet(target, root / "target.parquet")
    common = ["--model", model, "--train", train_path, "--target", target_path, "--shard-rows", 11, "--no-progress",
              "--form", "text"]
    with local_ray():
        run_ok("value", *common, "--out", root / "groups", "--mode", "groups", "--group-column", "class")
        run_ok("value", *common, "--out", root / "pairwise", "--mode", "pairwise")
        sketch = ["sketch", "--model", model, "--dim", 64, "--form", "text", "--shard-rows", 11, "--no-progress"]
        run_ok(*sketch, "--data", train_path, "--out", root / "train-index")
        run_ok(*sketch, "--data", target_path, "--out", root / "target-index",  # the default index is centered:
               "--center-stats", root / "train-index" / "center")                # its targets on the same μ
        run_ok("score", "--index", root / "train-index", "--target-index", root / "target-index", "--out",
               root / "score", "--no-progress")
    run_ok("select", "--scores", root / "groups", "--data", train_path, "--out", root / "selected",
           "--top-fraction", 0.5)
    pages = {name: write_report(str(root / name), top=TOP) for name in ("groups", "pairwise", "score", "selected")}
    return SimpleNamespace(root=root, rows=rows, train=train, target=target, pages=pages)


@pytest.fixture(scope="module")
def browser():
    from browser import headless_chromium, missing

    if missing():
        pytest.skip(f"the headless browser test {missing()}")
    profile = tempfile.mkdtemp(prefix="forvalue-chromium-")
    driver = headless_chromium(profile)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(browser, path: str) -> dict:
    """Load the page from disk (as someone opening it would) and read what the browser rendered."""
    browser.get(Path(path).as_uri())
    return browser.execute_script("""
        const table = id => Array.from(document.querySelectorAll(`#${id} tbody tr`)).map(
            tr => Array.from(tr.cells).map(td => td.textContent));
        return {ready: document.readyState, title: document.title,
                images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth,
                                                               alt: i.alt, src: i.src.slice(0, 22)})),
                top: table('top-rows'), bottom: table('bottom-rows'), rejected: table('rejected-reasons'),
                summary: table('score-summary'), variant: document.getElementById('variant').textContent};
    """)


def expected_ranking(out: Path) -> list[tuple[str, float]]:
    """(id, mean over targets) in report order: highest first, ties by id (as `select`)."""
    scores = read_scores(out)
    return sorted(((i, float(np.mean(v))) for i, v in scores.items()), key=lambda kv: (-kv[1], kv[0]))


def check_loads_cleanly(browser, page: dict, n_images: int):
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    assert page["ready"] == "complete"
    assert len(page["images"]) == n_images, page["images"]
    for img in page["images"]:
        assert img["complete"] and img["width"] > 0 and img["src"] == "data:image/png;base64,", img


def test_groups_report_in_a_browser(runs, browser):
    page = open_page(browser, runs.pages["groups"])
    check_loads_cleanly(browser, page, n_images=3)  # distribution, value vs NLL/length, rejected reasons
    ranking = expected_ranking(runs.root / "groups")
    by_id = {r["id"]: r for r in runs.rows}
    names = target_ids(runs.root / "groups")
    assert names == ["0", "1", "2"]
    for table, expected in ((page["top"], ranking[:TOP]), (page["bottom"], ranking[::-1][:TOP])):
        assert [row[1] for row in table] == [i for i, _ in expected]
        for row, (rid, value) in zip(table, expected):
            assert float(row[2].replace(",", "")) == pytest.approx(value, rel=1e-3)
            per_group = [float(x.replace(",", "")) for x in row[3:6]]  # one column per group
            assert per_group == pytest.approx(read_scores(runs.root / "groups")[rid].tolist(), rel=1e-3)
            assert row[-1] == cut(by_id[rid]["text"])  # form text: the text was valued, no response column
    assert "groups mode" in page["variant"] and "not centered" in page["variant"]
    rejected = {row[0]: int(row[1]) for row in page["rejected"]}
    reasons = pq.read_table(runs.root / "groups" / "rejected").to_pylist()
    assert sum(rejected.values()) == len(reasons) == 3
    assert rejected == {"column 'text' is empty": 2, "duplicate id within its shard": 1}
    summary = {row[0]: [float(x.replace(",", "")) for x in row[1:]] for row in page["summary"]}
    mat = as_matrix(read_scores(runs.root / "groups"), [i for i, _ in ranking])
    for k, name in enumerate(names):  # exact mean, std, min, max per group, over every row
        got, col = summary[name], mat[:, k]
        assert got == pytest.approx([col.mean(), col.std(), col.min(), col.max()], rel=1e-3, abs=1e-9)
    pngs = sorted(p.name for p in (runs.root / "groups" / "report").glob("*.png"))
    assert pngs == ["distribution.png", "rejected.png", "value_vs_difficulty.png"]


def test_pairwise_report_summarises_each_target(runs, browser):
    page = open_page(browser, runs.pages["pairwise"])
    check_loads_cleanly(browser, page, n_images=3)
    ranking = expected_ranking(runs.root / "pairwise")
    assert [row[1] for row in page["top"]] == [i for i, _ in ranking[:TOP]]
    assert "pairwise mode" in page["variant"]
    ids = target_ids(runs.root / "pairwise")
    assert [row[0] for row in page["summary"]] == ids == [r["id"] for r in runs.target]
    mat = as_matrix(read_scores(runs.root / "pairwise"), [i for i, _ in ranking])
    assert [float(row[1].replace(",", "")) for row in page["summary"]] == pytest.approx(mat.mean(0).tolist(),
                                                                                        rel=1e-3)


def test_score_report_joins_text_through_the_index(runs, browser):
    """A `score` output's parts follow the sketch index's parts, which follow the index's input shards."""
    page = open_page(browser, runs.pages["score"])
    check_loads_cleanly(browser, page, n_images=2)  # the rows were rejected by the index, not by score
    ranking = expected_ranking(runs.root / "score")
    by_id = {r["id"]: r for r in runs.rows}
    assert [row[1] for row in page["top"]] == [i for i, _ in ranking[:TOP]]
    assert [row[-1] for row in page["top"] + page["bottom"]] == [
        cut(by_id[i]["text"]) for i, _ in ranking[:TOP] + ranking[::-1][:TOP]]
    assert "TensorSketches (dim 64, seed 0)" in page["variant"]


def test_select_report(runs, browser):
    page = open_page(browser, runs.pages["selected"])
    check_loads_cleanly(browser, page, n_images=1)  # a selection keeps no NLL, lengths or rejections
    parts = sorted((runs.root / "selected" / "_selection").glob("*.parquet"))
    chosen = sorted((r for p in parts for r in pq.read_table(p).to_pylist()), key=lambda r: (-r["score"], r["id"]))
    assert [row[1] for row in page["top"]] == [r["id"] for r in chosen[:TOP]]
    assert [row[1] for row in page["bottom"]] == [r["id"] for r in chosen[::-1][:TOP]]
    by_id = {r["id"]: r for r in runs.rows}
    # no settings in a select output: form auto, prompt + response first
    assert all([row[-2], row[-1]] == [cut(by_id[row[1]]["prompt"]), cut(by_id[row[1]]["response"])]
               for row in page["top"] + page["bottom"])
    assert "a selection" in page["variant"]


def test_report_reads_only_the_shown_rows_shards(runs, monkeypatch):
    """The row texts come from the shards of the shown rows alone, never the whole input."""
    from forvalue_ray import io

    read = []
    original = io.read_shard
    monkeypatch.setattr(io, "read_shard", lambda shard: read.append(shard.key) or original(shard))
    plan_shards = pq.read_table(runs.root / "groups" / "_plan_shards.parquet")["key"].to_pylist()
    write_report(str(runs.root / "groups"), top=1)
    ranking = expected_ranking(runs.root / "groups")
    shard_of = {}
    for key in plan_shards:
        for rid in pq.read_table(runs.root / "groups" / "scores" / f"{key}.parquet")["id"].to_pylist():
            shard_of[rid] = key
    assert sorted(read) == sorted({shard_of[ranking[0][0]], shard_of[ranking[-1][0]]})
    assert len(plan_shards) == 3


def test_reason_categories():
    assert reason_category("over-long: 300 tokens > max_length 256") == "over-long"
    assert reason_category("malformed JSON line at byte 1234: Expecting value") == "malformed JSON line at byte N"
    assert reason_category("column 'text' is empty") == "column 'text' is empty"


def test_not_an_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a forvalue-ray output"):
        write_report(str(tmp_path))
