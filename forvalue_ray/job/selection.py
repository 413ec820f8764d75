"""``select``: write the top (or bottom) rows by value in the data's own format, as distributed passes.

Scores are shard-aligned with the input (``scores/<shard>.parquet`` holds the rows of input shard ``<shard>``), so
each input shard is filtered by its own score part with no global join. The threshold is exact: per group,
histograms of the scores over the shards are refined until the rows around the cut fit in memory, which are then
sorted (ties broken by id): the same set a full sort gives (:func:`selected_ids` is that full sort, kept as the
reference). The driver holds the plan and per-group counts, never ids or scores.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import io
from ..io import Shards
from . import executor, parts
from .steps import candidates, counts_at_or_above, group_stats, ranked_values, selection_counts, write_selected

CUT_BINS = 1024  # histogram bins per group and refinement round
CUT_CANDIDATES = 1 << 16  # rows around a cut gathered on the driver to place it exactly


def selected_ids(scores: pa.Table, *, top_fraction=None, top_k=None, bottom_fraction=None,
                 groups: dict | None = None, target: int | None = None) -> dict[str, float]:
    """The reference selection by a full sort (small data, tests): ids → score of the chosen rows; per group
    when ``groups`` maps id → group. Order: score descending, ties by id ascending; bottom is its tail."""
    ids = scores["id"].to_pylist()
    values = ranked_values(scores, target)
    by_group: dict = {}
    for i, rid in enumerate(ids):
        by_group.setdefault(None if groups is None else groups.get(rid), []).append(i)
    chosen = {}
    for members in by_group.values():
        order = sorted(members, key=lambda i: (-values[i], ids[i]))
        k = _wanted(len(order), top_fraction, top_k, bottom_fraction)
        chosen.update({ids[i]: float(values[i]) for i in (order[len(order) - k:] if bottom_fraction is not None
                                                           else order[:k])})
    return chosen


def _wanted(n: int, top_fraction, top_k, bottom_fraction) -> int:
    if top_k is not None:
        return min(top_k, n)
    return int(round((top_fraction if top_fraction is not None else bottom_fraction) * n))


def find_cuts(shards: Shards, wanted: dict, stats: dict, keys_kw: dict) -> dict:
    """Per group, the ``wanted``-th row in (score desc, id asc) order: (score, id), found by refining
    histograms over the shards (each round one distributed pass, CUT_BINS bins per group) until at most
    CUT_CANDIDATES rows remain around it, which are sorted on the driver."""
    cuts: dict = {}
    state = {}  # group → [lo, hi, rows above hi, rows within [lo, hi]]
    for g, m in wanted.items():
        n, lo, hi = stats[g]
        if m <= 0 or m >= n:
            cuts[g] = None if m <= 0 else "all"
        else:
            state[g] = [lo, hi, 0, n]
    while any(s[3] > CUT_CANDIDATES and s[0] < s[1] for s in state.values()):
        refine = {g: s for g, s in state.items() if s[3] > CUT_CANDIDATES and s[0] < s[1]}
        edges = {}
        for g, (lo, hi, _, _) in refine.items():
            inner = np.unique(np.linspace(lo, hi, CUT_BINS + 1)[1:])
            edges[g] = [lo, hi, [float(lo)] + [float(e) for e in inner if lo < e <= hi]]
        totals = {g: np.zeros(len(e[2]), dtype=np.int64) for g, e in edges.items()}
        for res in executor.shard_pass(shards, counts_at_or_above, edges=edges, **keys_kw):
            for g, counts in res["counts"]:
                totals[g] += np.asarray(counts, dtype=np.int64)
        for g, (lo, hi, above, _) in refine.items():
            e, ge = edges[g][2], totals[g]  # ge[j]: rows of the interval with value >= e[j]; e[0] = lo
            j = int(np.nonzero(above + ge >= wanted[g])[0].max())  # the highest edge with ≥ m rows at or above
            new_hi = hi if j == len(e) - 1 else float(np.nextafter(e[j + 1], -np.inf))
            new_above = above + (0 if j == len(e) - 1 else int(ge[j + 1]))
            state[g] = [e[j], new_hi, new_above, int(ge[j]) - (new_above - above)]
    rows: dict = {}
    if state:
        for res in executor.shard_pass(shards, candidates, intervals={g: s[:2] for g, s in state.items()}, **keys_kw):
            for g, v, i in res["rows"]:
                rows.setdefault(g, []).append((-v, i))
    for g, s in state.items():
        ordered = sorted(rows.get(g, []))
        neg_v, rid = ordered[wanted[g] - s[2] - 1]
        cuts[g] = (-neg_v, rid)
    return cuts


def select(scores_dir: str, data: str | None, out: str, *, top_fraction=None, top_k=None, bottom_fraction=None,
           per_group: str | None = None, target: str | None = None, overwrite: bool = False) -> dict:
    """Write the chosen rows of the scored data in its own format (Parquet or JSONL; HF Arrow → Parquet).

    ``data`` defaults to the input the scores were computed from (it must be that input: scores are
    shard-aligned with it). Exactly once and resumable like ``value``: re-running the same selection into the
    same ``out`` finishes it; a different one is refused unless ``overwrite``."""
    if sum(x is not None for x in (top_fraction, top_k, bottom_fraction)) != 1:
        raise ValueError("give exactly one of --top-fraction, --top-k, --bottom-fraction")
    for name, frac in (("--top-fraction", top_fraction), ("--bottom-fraction", bottom_fraction)):
        if frac is not None and not 0 < frac <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {frac}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {top_k}")
    plan, shards = parts.read_plan(scores_dir)
    if plan["kind"] != "scores":
        raise ValueError(f"{scores_dir} holds {plan['kind']}, not scores: select reads a value or score output")
    settings = plan["settings"]
    scored = settings.get("train")
    if settings.get("index"):  # a `score` output: its parts are named after the index's parts, i.e. data shards
        index_plan, data_shards = parts.read_plan(settings["index"])
        by_key = {s.key: s for s in data_shards}
        shards = Shards.of(dataclasses.replace(by_key[s.label.rsplit(".", 1)[0]], key=s.key) for s in shards)
        settings = index_plan["settings"]
        scored = settings["data"]
    if data is not None and [f[0] for f in io.list_inputs(data)] != [f[0] for f in io.list_inputs(scored)]:
        raise ValueError(f"--data {data} is not the data {scores_dir} scored ({scored}): scores are aligned with "
                         f"the scored input's shards; omit --data to use it")
    target_index = None
    if target is not None:
        names = pq.read_table(io.join(scores_dir, "targets.parquet"))["id"].to_pylist()
        if target not in names:
            raise ValueError(f"--target {target!r} is not among the targets {names[:10]}")
        target_index = names.index(target)
    criteria = {"scores": plan["fingerprint"], "top_fraction": top_fraction, "top_k": top_k,
                "bottom_fraction": bottom_fraction, "per_group": per_group, "target": target}
    record = {"kind": "selection", "fingerprint": parts.digest(criteria), "settings": criteria}
    done = _prepare_selection(out, record, overwrite)
    executor.init_ray(None)
    keys_kw = {"scores_dir": scores_dir, "id_column": settings.get("id_column", "id"), "per_group": per_group,
               "target": target_index}
    stats: dict = {}
    for res in executor.shard_pass(shards, group_stats, **keys_kw):
        for g, n, lo, hi in res["groups"]:
            n0, lo0, hi0 = stats.get(g, (0, np.inf, -np.inf))
            stats[g] = (n0 + n, min(lo0, lo), max(hi0, hi))
    wanted = {}
    for g, (n, _, _) in stats.items():
        k = _wanted(n, top_fraction, top_k, bottom_fraction)
        wanted[g] = n - k if bottom_fraction is not None else k
    cuts = find_cuts(shards, wanted, stats, keys_kw)
    selected = written = 0
    todo = shards.without(done)
    finished = shards.only(done)  # by an earlier, interrupted run: their counts from footers
    for res in itertools.chain(
            executor.shard_pass(todo, write_selected, out=out, cuts=cuts, bottom=bottom_fraction is not None,
                                **keys_kw),
            executor.shard_pass(finished, selection_counts, out=out)):
        selected, written = selected + res["selected"], written + res["written"]
    return {"selected": selected, "written": written, "scored": int(sum(n for n, _, _ in stats.values()))}


def _prepare_selection(out: str, record: dict, overwrite: bool) -> set[str]:
    """Create or resume a selection's --out; refuse another selection (or other files) there unless overwrite."""
    marker = io.join(out, "_select.json")
    if io.exists(marker):
        if io.read_json(marker).get("fingerprint") != record["fingerprint"]:
            if not overwrite:
                raise FileExistsError(f"{out} holds a different selection; choose another --out or pass --overwrite")
            io.remove_tree(out)
        elif overwrite:
            io.remove_tree(out)
    elif io.exists(out) and _listing(out):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose another --out or pass --overwrite")
        io.remove_tree(out)
    if not io.exists(marker):
        io.write_json_atomic(marker, record)
    io.remove_temporaries(out)  # a writer killed mid-write; its shard is redone
    return io.list_parts(io.join(out, parts.SELECTION))


def _listing(url: str) -> list[str]:
    fs, path = io.filesystem(url)
    return fs.ls(path, detail=False) if fs.exists(path) else []
