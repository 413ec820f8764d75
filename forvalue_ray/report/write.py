"""``write_report``: an output read, scanned, joined and rendered to ``OUT/report/``."""

from __future__ import annotations

import posixpath

from .. import io
from ..explain_page import explained_dirs, worst_spans
from ..job.parts import RunOutput
from .page import render
from .plots import figures
from .rows import index_dir, input_shards, join_rows, join_selection
from .scan import (DEFAULT_SAMPLE, DEFAULT_TOP, _add_rejected, _maybe_json, _read_table, _resolved_config, scan_scores,
                   scan_selection)


def write_report(out: str, *, top: int = DEFAULT_TOP, sample: int = DEFAULT_SAMPLE, seed: int = 0) -> str:
    """Write ``OUT/report/index.html`` (+ one PNG per figure); returns the page's path."""
    plan, plan_shards = RunOutput(out).load_plan() if RunOutput(out).has_plan() else (None, [])
    is_selection = plan is None and io.exists(io.join(out, "_select.json"))
    if plan is None and not is_selection:
        raise FileNotFoundError(f"{out} is not a forvalue-ray output: no _plan.json (value, score) and no "
                                f"_select.json (select)")
    if plan is not None and plan.get("kind") != "scores":
        raise ValueError(f"{out} is a sketch index (kind '{plan.get('kind')}'): it holds no scores; report on the "
                         f"output of `forvalue-ray score` against it")
    run = _maybe_json(io.join(out, "run.json")) or {}
    config = run.get("config") or _resolved_config(out) or (plan or {}).get("settings", {})
    command = "select" if is_selection else run.get("command", "score" if config.get("index") else "value")
    mode = "mean" if is_selection else config.get("mode", "mean")
    problems: list[str] = []
    if is_selection:
        names = ["score"]
        scan = scan_selection(out, top, sample, seed)
        settings = {}
        joined, problems = join_selection(out, scan.top.rows() + scan.bottom.rows())
    else:
        names = _read_table(io.join(out, "targets.parquet"))["id"].to_pylist() if io.exists(
            io.join(out, "targets.parquet")) else ["score"]
        scan = scan_scores(out, plan_shards, names, top, sample, seed)
        if scan.n_parts < len(plan_shards):
            problems.append(f"unfinished: {scan.n_parts} of {len(plan_shards)} shards have a score part "
                            f"(re-run the same command to finish)")
        try:
            shards, settings = input_shards(plan, plan_shards)
            joined, join_problems = join_rows(scan.top.rows() + scan.bottom.rows(), shards, settings)
            problems += join_problems
        except (OSError, ValueError, KeyError) as e:
            shards, settings, joined = {}, plan["settings"], {}
            problems.append(f"the input could not be read for the row texts: {e}")
        target_rejected = io.join(out, "target", "rejected.parquet")
        if io.exists(target_rejected):
            _add_rejected(scan.rejected, _read_table(target_rejected), prefix="target row: ")
    explained, spans = [], {}
    if not is_selection:
        try:
            explained = explained_dirs(out)
            spans = worst_spans(explained, [r["id"] for r in scan.bottom.rows()])
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"the token explanations could not be read: {e}")
    index = None if plan is None else index_dir(plan, plan_shards)
    index_meta = _maybe_json(RunOutput(index).index_json) if index else None
    value_label = "score" if mode == "mean" else "mean score over targets"
    figs = figures(scan, mode, names, value_label)
    report_dir = io.join(out, "report")
    page = render(out, command, config, run, plan, scan, names, mode, figs, joined, settings, problems, index_meta,
                  [(d, _link(report_dir, io.join(d, "index.html"))) for d in explained], spans)
    fs, base = io.filesystem(report_dir)
    fs.makedirs(base, exist_ok=True)
    for name, (_, png) in figs.items():
        with fs.open(f"{base}/{name}.png", "wb") as fh:
            fh.write(png)
    with fs.open(f"{base}/index.html", "w") as fh:
        fh.write(page)
    return io.join(report_dir, "index.html")


def _link(report_dir: str, target: str) -> str:
    """A link from the report page to ``target``: relative when both are on the same local disk."""
    if "://" in report_dir or "://" in target:
        return target
    return posixpath.relpath(target, report_dir)
