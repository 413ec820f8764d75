"""Using a finished output: ``verify`` it is complete and exactly-once, ``select`` rows by their value."""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import io
from .encode import Columns, Encoder
from .io import Shard
from .pipeline import PART_META


def verify(out: str) -> tuple[list[str], dict]:
    """Problems found (empty when the output is complete and exactly-once) and the counts checked."""
    problems: list[str] = []
    if not io.exists(io.join(out, "_plan.json")):
        return [f"{out} has no _plan.json: not a forvalue-ray output"], {}
    plan = io.read_json(io.join(out, "_plan.json"))
    kind, shards = plan["kind"], [Shard(**s) for s in plan["shards"]]
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
    totals = {"rows_read": 0, "scored": 0, "rejected": 0, "tokens": 0}
    ids = []
    for s in shards:
        if s.key not in parts:
            continue
        part = pq.read_table(f"{base}/{kind}/{s.key}.parquet", filesystem=fs)
        meta = json.loads(part.schema.metadata[PART_META])
        rej = (pq.read_table(f"{base}/rejected/{s.key}.parquet", filesystem=fs)
               if s.key in rejected_parts else pa.table({"id": pa.array([], pa.string())}))
        for k in totals:
            totals[k] += meta[k]
        if part.num_rows != meta["scored"] or rej.num_rows != meta["rejected"]:
            problems.append(f"shard {s.key}: part holds {part.num_rows} scored / {rej.num_rows} rejected rows, "
                            f"its footer says {meta['scored']} / {meta['rejected']}")
        expected = s.rows if s.rows >= 0 else _count_jsonl_rows(s)
        if meta["scored"] + meta["rejected"] != expected:
            problems.append(f"shard {s.key} ({s.label}): {meta['scored']} scored + {meta['rejected']} rejected "
                            f"!= {expected} input rows")
        for col in ("score", "scores", "sketch"):
            if col in part.column_names:
                values = part[col] if col == "score" else pc.list_flatten(part[col])
                if len(values) and not pc.all(pc.is_finite(values)).as_py():
                    problems.append(f"shard {s.key}: non-finite {col}")
        ids.append(part["id"])  # a rejected row may repeat a scored id: that is why it was rejected
    if ids:
        all_ids = pa.chunked_array([c for col in ids for c in col.chunks], pa.string())
        distinct = pc.count_distinct(all_ids).as_py()
        if distinct != len(all_ids):
            problems.append(f"{len(all_ids) - distinct} ids are scored more than once")
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


def selected_ids(scores: pa.Table, *, top_fraction=None, top_k=None, bottom_fraction=None,
                 groups: dict | None = None, target: int | None = None) -> dict[str, float]:
    """ids → score of the chosen rows; per group when ``groups`` maps id → group. Ties broken by id."""
    ids = scores["id"].to_pylist()
    if "score" in scores.column_names:
        values = scores["score"].to_numpy()
    else:
        mat = np.asarray(scores["scores"].to_pylist(), dtype=np.float64)
        values = mat.mean(1) if target is None else mat[:, target]
    by_group: dict = {}
    for i, rid in enumerate(ids):
        by_group.setdefault(None if groups is None else groups.get(rid), []).append(i)
    chosen = {}
    for members in by_group.values():
        order = sorted(members, key=lambda i: (-values[i], ids[i]))
        if bottom_fraction is not None:
            order, n = order[::-1], int(round(bottom_fraction * len(order)))
        elif top_fraction is not None:
            n = int(round(top_fraction * len(order)))
        else:
            n = min(top_k, len(order))
        chosen.update({ids[i]: float(values[i]) for i in order[:n]})
    return chosen


def select(scores_dir: str, data: str, out: str, *, top_fraction=None, top_k=None, bottom_fraction=None,
           per_group: str | None = None, target: str | None = None, overwrite: bool = False) -> dict:
    """Write the chosen rows of ``data`` in its own format (Parquet or JSONL; HF Arrow → Parquet)."""
    if sum(x is not None for x in (top_fraction, top_k, bottom_fraction)) != 1:
        raise ValueError("give exactly one of --top-fraction, --top-k, --bottom-fraction")
    for name, frac in (("--top-fraction", top_fraction), ("--bottom-fraction", bottom_fraction)):
        if frac is not None and not 0 < frac <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {frac}")
    if io.exists(out) and not overwrite and io.list_parts(out) | set(_listing(out)):
        raise FileExistsError(f"{out} is not empty; choose another --out or pass --overwrite")
    if overwrite:
        io.remove_tree(out)
    plan = io.read_json(io.join(scores_dir, "_plan.json"))
    settings = plan["settings"]
    scores = io.read_parts(io.join(scores_dir, "scores"))
    target_index = None
    if target is not None:
        names = pq.read_table(io.join(scores_dir, "targets.parquet"))["id"].to_pylist()
        if target not in names:
            raise ValueError(f"--target {target!r} is not among the targets {names[:10]}")
        target_index = names.index(target)
    enc = Encoder(None, columns=Columns(id=settings.get("id_column", "id")))
    shards = io.plan_shards(data, settings.get("format", "auto"), settings.get("shard_rows", io.DEFAULT_SHARD_ROWS),
                            settings.get("shard_bytes", io.DEFAULT_SHARD_BYTES))
    groups = None
    if per_group:
        groups = {enc.row_id(row, fb): row.get(per_group) for s in shards for fb, row in io.read_shard(s)[0]}
    chosen = selected_ids(scores, top_fraction=top_fraction, top_k=top_k, bottom_fraction=bottom_fraction,
                          groups=groups, target=target_index)
    written, written_ids = 0, set()
    for s in shards:
        rows, _ = io.read_shard(s)
        keep = []
        for fb, row in rows:
            rid = enc.row_id(row, fb)
            if rid in chosen and rid not in written_ids:  # a repeated id was rejected by the job: skip it too
                written_ids.add(rid)
                keep.append(row)
        if not keep:
            continue
        written += len(keep)
        stem = s.label.rsplit(".", 1)[0].replace("/", "__") + f"-{s.key}"
        if s.fmt == "jsonl":
            fs, path = io.filesystem(io.join(out, stem + ".jsonl"))
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with fs.open(path, "w") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
        else:
            io.write_table_atomic(io.join(out, stem + ".parquet"), pa.Table.from_pylist(keep))
    ranked = sorted(chosen.items(), key=lambda kv: (-kv[1], kv[0]))
    io.write_table_atomic(io.join(out, "_selection.parquet"),
                          pa.table({"id": [k for k, _ in ranked], "score": [v for _, v in ranked]}))
    return {"selected": len(chosen), "written": written, "scored": scores.num_rows}


def _listing(url: str) -> list[str]:
    fs, path = io.filesystem(url)
    return fs.ls(path, detail=False) if fs.exists(path) else []
