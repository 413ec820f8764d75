"""The output layout, shared by every pass and by ``verify``, ``select`` and ``report``::

    OUT/_plan.json                   settings, fingerprint, shard count (written last: a complete plan)
    OUT/_plan_shards.parquet         one row per shard (SHARD_FIELDS)
    OUT/scores|sketches/<shard>.parquet   one part per shard; its footer (PART_META) holds the shard's counts
    OUT/rejected/<shard>.parquet     (id, reason) of the shard's rejected rows, written before its part
    OUT/targets.parquet              the score columns' names
    OUT/run.json                     counts over the whole output, provenance, this invocation's timings
    OUT/config.resolved.yaml         every setting the job ran with
    SELECT_OUT/_selection/<shard>.parquet   (id, score) of a shard's selected rows: the shard's commit marker

A part is written atomically by the worker that computed it; a retried task rewrites the same bytes. Resuming
lists finished parts and skips them: O(shards) state, never O(rows).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__, io
from ..center import centered_sketch_rows
from ..io import SHARD_FIELDS, Shard, Shards
from ..sketch import compress_sketches

PART_META = b"forvalue"
COUNTS = ("rows_read", "scored", "rejected", "tokens")
RUN_COUNTS = COUNTS + ("truncated_rows", "truncated_tokens")
PLAN_FILE, PLAN_SHARDS_FILE = "_plan.json", "_plan_shards.parquet"
SELECTION = "_selection"


# ---- the plan -------------------------------------------------------------------------------------------------------


def shards_digest(shards: Shards) -> str:
    """A digest of the plan's shards, streamed (no string of the whole plan is built)."""
    h = hashlib.sha256()
    for s in shards:
        h.update("\t".join(str(getattr(s, f)) for f in SHARD_FIELDS).encode() + b"\n")
    return h.hexdigest()[:16]


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(settings: dict, shards: Shards) -> str:
    return digest([settings, shards_digest(shards)])


def plan_record(kind: str, settings: dict, shards: Shards) -> dict:
    """The plan's JSON: what the result depends on and its fingerprint (the shards go to OUT/_plan_shards.parquet)."""
    return {"kind": kind, "fingerprint": fingerprint(settings, shards), "settings": settings,
            "forvalue_ray": __version__}


def file_stamp(url: str, exclude: str | None = None) -> list:
    """Input identity without reading data: paths, sizes and modification times (``exclude``: the job's own
    output folder, never one of its inputs)."""
    out = []
    for full, _, _ in io.list_inputs(url, exclude=exclude):
        fs, p = io.filesystem(full)
        info = fs.info(p)
        out.append([full, info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")])
    return out


def write_plan(out: str, record: dict, shards: Shards) -> None:
    """OUT/_plan.json (settings, fingerprint, shard count) and OUT/_plan_shards.parquet (one row per shard; ~20 B
    per shard compressed). The JSON goes last: it marks a complete plan."""
    io.write_table_atomic(io.join(out, PLAN_SHARDS_FILE), Shards.of(shards).table)
    io.write_json_atomic(io.join(out, PLAN_FILE), {**record, "shard_count": len(shards), "shards_file": PLAN_SHARDS_FILE})


def read_plan(out: str) -> tuple[dict, Shards]:
    """The plan record and its shards; a plan written before the Parquet shard table keeps them in the JSON."""
    record = io.read_json(io.join(out, PLAN_FILE))
    if "shards" in record:
        return record, Shards.of(Shard(**s) for s in record.pop("shards"))
    fs, path = io.filesystem(io.join(out, record.get("shards_file", PLAN_SHARDS_FILE)))
    with fs.open(path, "rb") as fh:
        return record, Shards(pq.read_table(fh))


class OutputConflict(RuntimeError):
    pass


def prepare_out(out: str, record: dict, shards: Shards, overwrite: bool = False) -> set[str]:
    """Create or resume ``out``; refuse a different job there unless ``overwrite``. Returns the finished shards."""
    plan_url = io.join(out, PLAN_FILE)
    if io.exists(plan_url):
        old = io.read_json(plan_url)
        if "shards" in old:  # the plan of an older version (every shard in the JSON): its fingerprint, recomputed
            old["fingerprint"] = fingerprint(old.get("settings", {}), Shards.of(Shard(**s) for s in old.pop("shards")))
            if old["fingerprint"] == record["fingerprint"]:
                write_plan(out, record, shards)
        if old.get("fingerprint") != record["fingerprint"]:
            if not overwrite and not io.list_parts(io.join(out, old.get("kind", record["kind"]))):
                # a job that failed before finishing any shard (a typo, a bad target): nothing to keep, replace it
                print(f"{out}: replacing the plan of a job that finished no shard", file=sys.stderr)
                overwrite = True
            if not overwrite:
                changed = sorted(k for k in set(old.get("settings", {})) | set(record["settings"])
                                 if old.get("settings", {}).get(k) != record["settings"].get(k))
                raise OutputConflict(
                    f"{out} holds a different job (changed: {', '.join(changed) or 'input files'}); "
                    f"use another --out, or --overwrite to replace it")
            io.remove_tree(out)
        elif overwrite:
            io.remove_tree(out)
    if not io.exists(plan_url):
        write_plan(out, record, shards)
    else:
        io.remove_temporaries(out)  # a writer killed mid-write; its shard is redone
    return io.list_parts(io.join(out, record["kind"]))


# ---- parts ----------------------------------------------------------------------------------------------------------


def result_table(kind: str, ids: list[str], res: dict, mode: str = "mean", storage: str = "float32",
                 seed: int = 0, center: tuple[np.ndarray, float] | None = None) -> pa.Table:
    """The output schema: id, score (mean) | scores (groups, pairwise) | sketch [+ sketch_scale: int8, + center_dot:
    centered], n_tokens, nll. ``center``: a centered index's μ terms (TS(μ), ‖μ‖²), ``res`` scored against μ."""
    n = len(ids)
    cols = {"id": pa.array(ids, pa.string())}
    if kind == "sketches":
        centered = centered_sketch_rows(res, center) if n and center is not None else None
        sketch = centered.sketch if centered else res["sketch"] if n else np.zeros((0, 0), np.float32)
        values, scale = compress_sketches(sketch, storage, ids, seed)
        flat = pa.array(values.reshape(-1))
        cols["sketch"] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1]) if n else pa.array([], pa.list_(
            flat.type))
        if scale is not None:
            cols["sketch_scale"] = pa.array(scale, pa.float32())
        if centered:  # the exact ⟨G, μ⟩
            cols["center_dot"] = pa.array(centered.center_dot, pa.float64())
    elif mode != "mean":
        mat = res.get("pairwise", res.get("scores"))
        cols["scores"] = pa.array(list(mat.astype(np.float64)) if n else [], pa.list_(pa.float64()))
    else:
        cols["score"] = pa.array(res["scores"][:, 0] if n else [], pa.float64())
    cols["n_tokens"] = pa.array(res["n_tokens"] if n else [], pa.int64())
    cols["nll"] = pa.array(res["nll"] if n else [], pa.float64())
    return pa.table(cols)


def stored_sketches(table: pa.Table) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """An index table's sketches [n, dim] in their stored dtype (no copy), the int8 rows' scales and, centered,
    each row's ⟨G, μ⟩."""
    flat = table["sketch"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    scale, center_dot = (table[c].to_numpy() if c in table.column_names else None
                         for c in ("sketch_scale", "center_dot"))
    return flat.reshape(table.num_rows, -1), scale, center_dot


def write_rejected(out: str, key: str, rejected: list[tuple[str, str]]) -> None:
    """A shard's rejected rows (id, reason): written before its part."""
    io.write_table_atomic(io.join(out, "rejected", key + ".parquet"),
                          pa.table({"id": pa.array([r[0] for r in rejected], pa.string()),
                                    "reason": pa.array([r[1] for r in rejected], pa.string())}))


def write_part(out: str, kind: str, key: str, table: pa.Table, meta: dict) -> None:
    """A shard's part with its counts in the footer: its existence marks the shard done, so it goes last."""
    write_with_meta(io.join(out, kind, key + ".parquet"), table, meta)


def write_with_meta(url: str, table: pa.Table, meta: dict) -> None:
    io.write_table_atomic(url, table.replace_schema_metadata({PART_META: json.dumps(meta)}))


def part_meta(url: str) -> dict:
    """A part's footer counts, read without its data."""
    fs, path = io.filesystem(url)
    return json.loads(pq.read_schema(path, filesystem=fs).metadata[PART_META])


def write_targets(out: str, ids: list[str]) -> None:
    io.write_table_atomic(io.join(out, "targets.parquet"), pa.table({"id": pa.array(ids, pa.string())}))


# ---- the run's summary ----------------------------------------------------------------------------------------------


def write_run_json(cfg, kind: str, shards: Shards, done_before: set[str], tally: dict | None, t0: float,
                   extra: dict, faults: dict | None = None) -> dict:
    """Counts over the whole output (a resumed run too), plus provenance: this invocation's ``tally`` (from
    executor.run_shards) plus the footers of the shards finished before it (none read on a run that did not resume).
    """
    tally = tally or {"shards": 0, **dict.fromkeys(RUN_COUNTS, 0)}
    counts = {k: tally[k] for k in RUN_COUNTS}
    for key in shards.only(done_before).keys() if done_before else ():
        meta = part_meta(io.join(cfg.out, kind, key + ".parquet"))
        for k in RUN_COUNTS:
            counts[k] += meta.get(k, 0)
    wall = time.time() - t0
    run = {"command": cfg.command, "config": asdict(cfg), "counts": {**counts, "shards": len(shards)},
           "this_invocation": {"shards": tally["shards"], "wall_seconds": round(wall, 3),
                               "rows_per_second": round((tally["scored"] + tally["rejected"]) / max(wall, 1e-9), 3),
                               **(faults or {"nodes_lost": [], "retried_shards": [], "shards_per_node": {}})},
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "forvalue_ray": __version__, **extra}
    io.write_json_atomic(io.join(cfg.out, "run.json"), run)
    return run


def write_resolved_config(cfg) -> None:
    """OUT/config.resolved.yaml: every setting the job ran with (re-runnable with ``forvalue-ray run --config``)."""
    import yaml

    fs, p = io.filesystem(io.join(cfg.out, "config.resolved.yaml"))
    with fs.open(p, "w") as fh:
        yaml.safe_dump({k: v for k, v in asdict(cfg).items() if k != "extra"}, fh, sort_keys=False)


def print_run_summary(cfg, run: dict) -> None:
    c = run["counts"]
    print(f"{cfg.command}: {c['scored']:,} rows scored, {c['rejected']:,} rejected, {c['tokens']:,} tokens "
          f"in {c['shards']} shards; {run['this_invocation']['wall_seconds']:.1f} s this run → {cfg.out}",
          file=sys.stderr)
    if c.get("truncated_rows"):
        print(f"{cfg.command}: {c['truncated_rows']:,} rows truncated at max_length, {c['truncated_tokens']:,} tokens "
              f"dropped (--max-length, or --overlong reject)", file=sys.stderr)
    inv = run["this_invocation"]
    if inv["nodes_lost"] or inv["retried_shards"]:
        print(f"{cfg.command}: survived {len(inv['nodes_lost'])} lost Ray nodes; {len(inv['retried_shards'])} shards "
              f"redone (run.json: this_invocation)", file=sys.stderr)
