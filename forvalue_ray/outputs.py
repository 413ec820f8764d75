"""Using a finished output: ``verify`` it is complete and exactly-once, ``select`` rows by their value.

Both are distributed passes over the shards (Ray tasks, one shard each); the driver holds the plan and
aggregates counts, never ids or scores. Scores are shard-aligned with the input (``scores/<shard>.parquet``
holds the rows of input shard ``<shard>``), so ``select`` filters each input shard by its own score part with
no global join. Its threshold is exact: per group, histograms of the scores over the shards are refined until
the rows around the cut fit in memory, which are then sorted (ties broken by id) — the same set a full sort
gives (:func:`selected_ids` is that full sort, kept as the reference).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import posixpath
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import io
from .encode import Columns, Encoder
from .io import Shard
from .pipeline import PART_META, digest, init_ray, shards_dataset

SELECTION = "_selection"  # OUT/_selection/<shard>.parquet: (id, score) of the selected rows of each shard
CUT_BINS = 1024  # histogram bins per group and refinement round
CUT_CANDIDATES = 1 << 16  # rows around a cut gathered on the driver to place it exactly


def shard_pass(shards: list[Shard], fn, *, num_cpus: float = 0.5, **kwargs) -> Iterator[dict]:
    """``fn(shard, **kwargs)`` (a JSON-able dict) for every shard, as Ray tasks; results stream back as they
    finish. The driver holds one result at a time."""
    if not shards:
        return
    ds = shards_dataset(shards).map_batches(_apply, batch_size=1, fn_kwargs={"fn": fn, "kwargs": kwargs},
                                            num_cpus=num_cpus)
    for row in ds.iter_rows():
        yield json.loads(row["result"])


def _apply(batch, fn, kwargs):
    return {"result": [json.dumps(fn(s, **kwargs)) for s in io.shards_from_columns(batch)]}


# ---- verify ---------------------------------------------------------------------------------------------------------


COUNTS = ("rows_read", "scored", "rejected", "tokens")


def check_shard(shard: Shard, out: str, kind: str) -> dict:
    """One finished shard: footer counts against its parts and its input rows, finite values."""
    fs, base = io.filesystem(out)
    part = pq.read_table(f"{base}/{kind}/{shard.key}.parquet", filesystem=fs)
    meta = json.loads(part.schema.metadata[PART_META])
    rejected = f"{base}/rejected/{shard.key}.parquet"
    rej_rows = pq.read_metadata(rejected, filesystem=fs).num_rows if fs.exists(rejected) else 0
    problems = []
    if part.num_rows != meta["scored"] or rej_rows != meta["rejected"]:
        problems.append(f"shard {shard.key}: part holds {part.num_rows} scored / {rej_rows} rejected rows, "
                        f"its footer says {meta['scored']} / {meta['rejected']}")
    expected = shard.rows if shard.rows >= 0 else _count_jsonl_rows(shard)
    if meta["scored"] + meta["rejected"] != expected:
        problems.append(f"shard {shard.key} ({shard.label}): {meta['scored']} scored + {meta['rejected']} rejected "
                        f"!= {expected} input rows")
    for col in ("score", "scores", "sketch"):
        if col in part.column_names:
            values = part[col] if col == "score" else pc.list_flatten(part[col])
            if len(values) and not pc.all(pc.is_finite(values)).as_py():
                problems.append(f"shard {shard.key}: non-finite {col}")
    return {"counts": {k: meta.get(k, 0) for k in COUNTS}, "problems": problems}


ROWS_PER_ID_PARTITION = 5_000_000  # hash partitions of the duplicate-id group-by: 200 at 10^9 rows (Ray's default)


def duplicate_ids(out: str, kind: str, keys: list[str], n_rows: int, show: int = 3) -> tuple[int, list[str]]:
    """Ids scored more than once across all parts (``n_rows`` of them): a distributed group-by (a rejected row may
    repeat a scored id: that is why it was rejected, so only scored ids count)."""
    import ray

    if not keys:
        return 0, []
    paths = [io.join(out, kind, k + ".parquet") for k in keys]
    fs, _ = io.filesystem(out)
    partitions = max(1, math.ceil(n_rows / ROWS_PER_ID_PARTITION))  # a fixed 200 costs ~30 s on a small output
    counted = ray.data.read_parquet(paths, filesystem=fs).select_columns(["id"]).groupby(
        "id", num_partitions=partitions).count()
    repeated = counted.filter(lambda row: row["count()"] > 1).materialize()  # usually empty; counted once
    n = repeated.count()
    return n, [r["id"] for r in repeated.take(show)] if n else []


def verify(out: str) -> tuple[list[str], dict]:
    """Problems found (empty when the output is complete and exactly-once) and the counts checked."""
    problems: list[str] = []
    if not io.exists(io.join(out, "_plan.json")):
        return [f"{out} has no _plan.json: not a forvalue-ray output"], {}
    plan, shards = io.read_plan(out)
    kind = plan["kind"]
    parts, rejected_parts = io.list_parts(io.join(out, kind)), io.list_parts(io.join(out, "rejected"))
    keys = {s.key for s in shards}
    missing = sorted(keys - parts)
    if missing:
        problems.append(f"{len(missing)} of {len(shards)} shards have no {kind} part (first: {missing[0]}); "
                        f"re-run the same command to finish them")
    if keys - rejected_parts - set(missing):
        problems.append(f"{len(keys - rejected_parts - set(missing))} finished shards lack their rejected part")
    extra = sorted((parts | rejected_parts) - keys)
    if extra:
        problems.append(f"{len(extra)} parts belong to no planned shard (first: {extra[0]})")
    fs, base = io.filesystem(out)
    leftovers = [f for f in fs.find(base) if posixpath.basename(f).startswith(".tmp-")]
    if leftovers:
        problems.append(f"{len(leftovers)} unfinished temporary files (first: {leftovers[0]})")
    finished = [s for s in shards if s.key in parts]
    totals = dict.fromkeys(COUNTS, 0)
    init_ray(None)
    for res in shard_pass(finished, check_shard, out=out, kind=kind):
        for k in COUNTS:
            totals[k] += res["counts"][k]
        problems += res["problems"]
    n_dup, examples = duplicate_ids(out, kind, [s.key for s in finished], totals["scored"])
    if n_dup:
        problems.append(f"{n_dup} ids are scored more than once (e.g. {', '.join(map(repr, examples))}); "
                        f"give rows unique ids, or drop the duplicates from the input")
    if not missing and io.exists(io.join(out, "run.json")):
        counts = io.read_json(io.join(out, "run.json"))["counts"]
        if any(counts.get(k) != v for k, v in totals.items()):
            problems.append(f"run.json counts {counts} disagree with the parts {totals}")
    elif not missing:
        problems.append("run.json is missing: the run did not finish writing its summary")
    return problems, {**totals, "shards": len(shards), "finished_shards": len(parts & keys)}


def _count_jsonl_rows(shard: Shard) -> int:
    fs, path = io.filesystem(shard.path)
    return sum(1 for _, line in io._jsonl_lines(fs, path, shard.start, shard.stop) if line.strip())


# ---- select: an exact global cut found without gathering scores ------------------------------------------------------


def selected_ids(scores: pa.Table, *, top_fraction=None, top_k=None, bottom_fraction=None,
                 groups: dict | None = None, target: int | None = None) -> dict[str, float]:
    """The reference selection by a full sort (small data, tests): ids → score of the chosen rows; per group
    when ``groups`` maps id → group. Order: score descending, ties by id ascending; bottom is its tail."""
    ids = scores["id"].to_pylist()
    values = _values(scores, target)
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


def _values(scores: pa.Table, target: int | None) -> np.ndarray:
    if "score" in scores.column_names:
        return scores["score"].to_numpy()
    n = scores.num_rows
    mat = np.asarray(pc.list_flatten(scores["scores"]).to_numpy(), dtype=np.float64).reshape(n, -1) if n else \
        np.zeros((0, 1))
    return mat.mean(1) if target is None else mat[:, target]


def _wanted(n: int, top_fraction, top_k, bottom_fraction) -> int:
    if top_k is not None:
        return min(top_k, n)
    return int(round((top_fraction if top_fraction is not None else bottom_fraction) * n))


def shard_keys(shard: Shard, scores_dir: str, id_column: str, per_group: str | None,
               target: int | None) -> tuple[list[str], np.ndarray, list]:
    """The scored rows of one shard: ids, the values ranked, and (per group) each row's group from the input."""
    fs, path = io.filesystem(io.join(scores_dir, "scores", shard.key + ".parquet"))
    scores = pq.read_table(path, filesystem=fs)
    ids = scores["id"].to_pylist()
    values = _values(scores, target)
    if not per_group:
        return ids, values, [None] * len(ids)
    enc = Encoder(None, columns=Columns(id=id_column))
    group_of = {enc.row_id(row, fb): row.get(per_group) for fb, row in io.read_shard(shard)[0]}
    return ids, values, [_group_key(group_of.get(i)) for i in ids]


def _group_key(g) -> str | None:
    return None if g is None else json.dumps(g, sort_keys=True, default=str)


def _group_stats(shard: Shard, **keys_kw) -> dict:
    ids, values, groups = shard_keys(shard, **keys_kw)
    out: dict = {}
    for g, v in zip(groups, values):
        n, lo, hi = out.get(g, (0, np.inf, -np.inf))
        out[g] = (n + 1, min(lo, v), max(hi, v))
    return {"groups": [[g, n, lo, hi] for g, (n, lo, hi) in out.items()]}


def _counts_at_or_above(shard: Shard, edges: dict, **keys_kw) -> dict:
    """Per group: how many of the shard's rows lie at or above each edge, within the group's interval."""
    ids, values, groups = shard_keys(shard, **keys_kw)
    by_group: dict = {}
    for g, v in zip(groups, values):
        by_group.setdefault(g, []).append(v)
    out = []
    for g, (lo, hi, cut_edges) in edges.items():
        v = np.sort(np.asarray(by_group.get(g, []), dtype=np.float64))
        v = v[(v >= lo) & (v <= hi)]
        out.append([g, (len(v) - np.searchsorted(v, cut_edges, side="left")).tolist()])
    return {"counts": out}


def _candidates(shard: Shard, intervals: dict, **keys_kw) -> dict:
    ids, values, groups = shard_keys(shard, **keys_kw)
    out = []
    for i, v, g in zip(ids, values, groups):
        spec = intervals.get(g)
        if spec is not None and spec[0] <= v <= spec[1]:
            out.append([g, float(v), i])
    return {"rows": out}


def find_cuts(shards: list[Shard], wanted: dict, stats: dict, keys_kw: dict) -> dict:
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
        for res in shard_pass(shards, _counts_at_or_above, edges=edges, **keys_kw):
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
        for res in shard_pass(shards, _candidates, intervals={g: s[:2] for g, s in state.items()}, **keys_kw):
            for g, v, i in res["rows"]:
                rows.setdefault(g, []).append((-v, i))
    for g, s in state.items():
        ordered = sorted(rows.get(g, []))
        neg_v, rid = ordered[wanted[g] - s[2] - 1]
        cuts[g] = (-neg_v, rid)
    return cuts


def _is_before(v: float, rid: str, cut) -> bool:
    """(v, rid) at or before the cut in (score desc, id asc) order."""
    return v > cut[0] or (v == cut[0] and rid <= cut[1])


def _write_selected(shard: Shard, out: str, cuts: dict, bottom: bool, **keys_kw) -> dict:
    """Filter one input shard by its own score part; write its chosen rows in the input's format, then its
    selection part (id, score), the shard's commit marker."""
    ids, values, groups = shard_keys(shard, **keys_kw)
    chosen = {}
    for i, v, g in zip(ids, values, groups):
        cut = cuts[g]
        before = cut == "all" or (cut is not None and _is_before(v, i, cut))
        if before != bottom:
            chosen[i] = float(v)
    enc = Encoder(None, columns=Columns(id=keys_kw["id_column"]))
    keep, seen = [], set()
    if chosen:
        for fb, row in io.read_shard(shard)[0]:
            rid = enc.row_id(row, fb)
            if rid in chosen and rid not in seen:  # a repeated id was rejected by the job: skip it too
                seen.add(rid)
                keep.append(row)
    if keep:
        stem = shard.label.rsplit(".", 1)[0].replace("/", "__") + f"-{shard.key}"
        if shard.fmt == "jsonl":
            io.write_bytes_atomic(io.join(out, stem + ".jsonl"),
                                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep).encode())
        else:
            io.write_table_atomic(io.join(out, stem + ".parquet"), pa.Table.from_pylist(keep))
    ranked = sorted(chosen.items(), key=lambda kv: (-kv[1], kv[0]))
    counts = {"selected": len(chosen), "written": len(keep)}
    part = pa.table({"id": pa.array([k for k, _ in ranked], pa.string()),
                     "score": pa.array([v for _, v in ranked], pa.float64())})
    io.write_table_atomic(io.join(out, SELECTION, shard.key + ".parquet"),
                          part.replace_schema_metadata({PART_META: json.dumps(counts)}))
    return counts


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
    plan, shards = io.read_plan(scores_dir)
    if plan["kind"] != "scores":
        raise ValueError(f"{scores_dir} holds {plan['kind']}, not scores: select reads a value or score output")
    settings = plan["settings"]
    scored = settings.get("train")
    if settings.get("index"):  # a `score` output: its parts are named after the index's parts, i.e. data shards
        index_plan, data_shards = io.read_plan(settings["index"])
        by_key = {s.key: s for s in data_shards}
        shards = [dataclasses.replace(by_key[s.label.rsplit(".", 1)[0]], key=s.key) for s in shards]
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
    record = {"kind": "selection", "fingerprint": digest(criteria), "settings": criteria}
    done = _prepare_selection(out, record, overwrite)
    init_ray(None)
    keys_kw = {"scores_dir": scores_dir, "id_column": settings.get("id_column", "id"), "per_group": per_group,
               "target": target_index}
    stats: dict = {}
    for res in shard_pass(shards, _group_stats, **keys_kw):
        for g, n, lo, hi in res["groups"]:
            n0, lo0, hi0 = stats.get(g, (0, np.inf, -np.inf))
            stats[g] = (n0 + n, min(lo0, lo), max(hi0, hi))
    wanted = {}
    for g, (n, _, _) in stats.items():
        k = _wanted(n, top_fraction, top_k, bottom_fraction)
        wanted[g] = n - k if bottom_fraction is not None else k
    cuts = find_cuts(shards, wanted, stats, keys_kw)
    selected = written = 0
    todo = [s for s in shards if s.key not in done]
    finished = [s for s in shards if s.key in done]  # by an earlier, interrupted run: their counts from footers
    for res in itertools.chain(
            shard_pass(todo, _write_selected, out=out, cuts=cuts, bottom=bottom_fraction is not None, **keys_kw),
            shard_pass(finished, _selection_counts, out=out)):
        selected, written = selected + res["selected"], written + res["written"]
    return {"selected": selected, "written": written, "scored": int(sum(n for n, _, _ in stats.values()))}


def _selection_counts(shard: Shard, out: str) -> dict:
    fs, path = io.filesystem(io.join(out, SELECTION, shard.key + ".parquet"))
    return json.loads(pq.read_schema(path, filesystem=fs).metadata[PART_META])


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
    return io.list_parts(io.join(out, SELECTION))


def _listing(url: str) -> list[str]:
    fs, path = io.filesystem(url)
    return fs.ls(path, detail=False) if fs.exists(path) else []
