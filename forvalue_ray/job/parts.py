"""The output layout, shared by every pass and by ``verify``, ``select`` and ``report``::

    OUT/_plan.json                   settings, fingerprint, shard count (written last: a complete plan)
    OUT/_plan_shards.parquet         one row per shard (SHARD_FIELDS)
    OUT/scores|sketches/<shard>.parquet   one part per shard; its footer (PART_META) holds the shard's counts
    OUT/rejected/<shard>.parquet     (id, reason) of the shard's rejected rows, written before its part
    OUT/targets.parquet              the score columns' names
    OUT/index.json                   a sketch index's settings and centering μ
    OUT/target/, OUT/center/         target statistics (artifacts.py), their rejected rows; center/: its sample
    OUT/run.json                     counts over the whole output, provenance, this invocation's timings
    OUT/config.resolved.yaml         every setting the job ran with
    OUT/report/, OUT/explain/        ``report`` and ``explain`` pages
    SELECT_OUT/_select.json          a selection's criteria and fingerprint
    SELECT_OUT/_selection/<shard>.parquet   (id, score) of a shard's selected rows: the shard's commit marker

:class:`RunOutput` names every one of these paths, with its I/O beside it. A part is written atomically by the
worker that computed it; a retried task rewrites the same bytes. Resuming lists finished parts and skips them:
O(shards) state, never O(rows).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__, io
from ..center import centered_sketch_rows
from ..io import SHARD_FIELDS, Shard, Shards
from ..sketch import compress_sketches

if TYPE_CHECKING:
    from .spec import RunSpec

PART_META = b"forvalue"
COUNTS = ("rows_read", "scored", "rejected", "tokens")
RUN_COUNTS = COUNTS + ("truncated_rows", "truncated_tokens")
PLAN_FILE, PLAN_SHARDS_FILE = "_plan.json", "_plan_shards.parquet"
SELECTION = "_selection"


class RunOutput:
    """One output folder: every path under it, each with its save / exists / load side by side, so that no other
    module spells a file name of the layout."""

    __slots__ = ("root",)

    def __init__(self, root: str):
        self.root = root

    def url(self, *names: str) -> str:
        return io.join(self.root, *names)

    # ---- the plan
    def has_plan(self) -> bool:
        return io.exists(self.url(PLAN_FILE))

    def save_plan(self, record: dict, shards: Shards) -> None:
        """OUT/_plan.json (settings, fingerprint, shard count) and OUT/_plan_shards.parquet (one row per shard; ~20 B
        per shard compressed). The JSON goes last: it marks a complete plan."""
        io.write_table_atomic(self.url(PLAN_SHARDS_FILE), Shards.of(shards).table)
        io.write_json_atomic(self.url(PLAN_FILE), {**record, "shard_count": len(shards),
                                                   "shards_file": PLAN_SHARDS_FILE})

    def load_plan_record(self) -> dict:
        """The plan's JSON alone (an older version's holds every shard too)."""
        return io.read_json(self.url(PLAN_FILE))

    def load_plan(self) -> tuple[dict, Shards]:
        """The plan record and its shards; a plan written before the Parquet shard table keeps them in the JSON."""
        record = self.load_plan_record()
        if "shards" in record:
            return record, Shards.of(Shard(**s) for s in record.pop("shards"))
        fs, path = io.filesystem(self.url(record.get("shards_file", PLAN_SHARDS_FILE)))
        with fs.open(path, "rb") as fh:
            return record, Shards(pq.read_table(fh))

    # ---- one part per shard: kind is scores, sketches, rejected or _selection
    def parts_dir(self, kind: str) -> str:
        return self.url(kind)

    def part(self, kind: str, key: str) -> str:
        return self.url(kind, key + ".parquet")

    def finished(self, kind: str) -> set[str]:
        return io.list_parts(self.parts_dir(kind))

    # ---- the score columns
    def save_targets(self, ids: list[str]) -> None:
        io.write_table_atomic(self.url("targets.parquet"), pa.table({"id": pa.array(ids, pa.string())}))

    def load_targets(self) -> list[str]:
        fs, path = io.filesystem(self.url("targets.parquet"))
        with fs.open(path, "rb") as fh:
            return pq.read_table(fh)["id"].to_pylist()

    # ---- a sketch index's settings
    @property
    def index_json(self) -> str:
        return self.url("index.json")

    def save_index(self, meta: dict) -> None:
        io.write_json_atomic(self.index_json, meta)

    def load_index(self) -> dict:
        return io.read_json(self.index_json)

    # ---- the run's summary and settings
    @property
    def run_json(self) -> str:
        return self.url("run.json")

    def has_run(self) -> bool:
        return io.exists(self.run_json)

    def save_run(self, run: dict) -> None:
        io.write_json_atomic(self.run_json, run)

    def load_run(self) -> dict:
        return io.read_json(self.run_json)

    @property
    def resolved_config(self) -> str:
        return self.url("config.resolved.yaml")

    def save_resolved_config(self, settings: dict) -> None:
        import yaml

        fs, p = io.filesystem(self.resolved_config)
        with fs.open(p, "w") as fh:
            yaml.safe_dump(settings, fh, sort_keys=False)

    # ---- artifacts: target statistics (OUT/target, OUT/center) and the center's sample
    def artifact(self, name: str) -> str:
        return self.url(name)

    def artifact_rejected(self, name: str) -> str:
        return self.url(name, "rejected.parquet")

    def center_sample(self, suffix: str) -> str:
        """The centering sample's rows (suffix jsonl or parquet: the training data's own kind)."""
        return self.url("center", "sample." + suffix)

    def save_center_sample_meta(self, meta: dict) -> None:
        io.write_json_atomic(self.url("center", "sample.json"), meta)

    # ---- explain's page (its default folder)
    def explain_dir(self) -> str:
        return self.url("explain")

    # ---- a selection
    @property
    def select_marker(self) -> str:
        return self.url("_select.json")

    def has_selection(self) -> bool:
        return io.exists(self.select_marker)

    def save_selection(self, record: dict) -> None:
        io.write_json_atomic(self.select_marker, record)

    def load_selection(self) -> dict:
        return io.read_json(self.select_marker)


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


class OutputConflict(RuntimeError):
    pass


def prepare_out(out: RunOutput, record: dict, shards: Shards, overwrite: bool = False) -> set[str]:
    """Create or resume ``out``; refuse a different job there unless ``overwrite``. Returns the finished shards."""
    if out.has_plan():
        old = out.load_plan_record()
        if "shards" in old:  # the plan of an older version (every shard in the JSON): its fingerprint, recomputed
            old["fingerprint"] = fingerprint(old.get("settings", {}), Shards.of(Shard(**s) for s in old.pop("shards")))
            if old["fingerprint"] == record["fingerprint"]:
                out.save_plan(record, shards)
        if old.get("fingerprint") != record["fingerprint"]:
            if not overwrite and not out.finished(old.get("kind", record["kind"])):
                # a job that failed before finishing any shard (a typo, a bad target): nothing to keep, replace it
                print(f"{out.root}: replacing the plan of a job that finished no shard", file=sys.stderr)
                overwrite = True
            if not overwrite:
                changed = sorted(k for k in set(old.get("settings", {})) | set(record["settings"])
                                 if old.get("settings", {}).get(k) != record["settings"].get(k))
                raise OutputConflict(
                    f"{out.root} holds a different job (changed: {', '.join(changed) or 'input files'}); "
                    f"use another --out, or --overwrite to replace it")
            io.remove_tree(out.root)
        elif overwrite:
            io.remove_tree(out.root)
    if not out.has_plan():
        out.save_plan(record, shards)
    else:
        io.remove_temporaries(out.root)  # a writer killed mid-write; its shard is redone
    return out.finished(record["kind"])


# ---- parts ----------------------------------------------------------------------------------------------------------


def result_table(kind: str, ids: list[str], res: dict, mode: str = "mean", storage: str = "float32",
                 seed: int = 0, center: tuple[np.ndarray, float] | None = None) -> pa.Table:
    """The output schema: id, score (mean) | scores (groups, pairwise; + embed: pairwise) | sketch [+ sketch_scale: int8 and binary,
    + sketch_norm: binary, + center_dot: centered], n_tokens, nll [, prompt_fit: null where a row has none]. ``center``: a centered index's μ terms (TS(μ), ‖μ‖²), ``res`` scored against μ."""
    n = len(ids)
    cols = {"id": pa.array(ids, pa.string())}
    if kind == "sketches":
        centered = centered_sketch_rows(res, center) if n and center is not None else None
        sketch = centered.sketch if centered else res["sketch"] if n else np.zeros((0, 0), np.float32)
        values, scale = compress_sketches(sketch, storage, ids, seed)
        flat = pa.array(values.reshape(-1))
        cols["sketch"] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1]) if n else pa.array([], pa.list_(
            flat.type))
        if scale is not None:  # binary: [s, ‖x‖] per row
            cols["sketch_scale"] = pa.array(scale.reshape(n, -1)[:, 0], pa.float32())
            if scale.ndim == 2:
                cols["sketch_norm"] = pa.array(scale[:, 1], pa.float32())
        if centered:  # the exact ⟨G, μ⟩
            cols["center_dot"] = pa.array(centered.center_dot, pa.float64())
    elif mode != "mean":
        mat = res.get("pairwise", res.get("scores"))
        cols["scores"] = pa.array(list(mat.astype(np.float64)) if n else [], pa.list_(pa.float64()))
        if "embed" in res:  # pairwise scores from a model pass (a `score` from sketches has none)
            cols["embed"] = pa.array(list(res["embed"]) if n else [], pa.list_(pa.float64()))
    else:
        cols["score"] = pa.array(res["scores"][:, 0] if n else [], pa.float64())
    cols["n_tokens"] = pa.array(res["n_tokens"] if n else [], pa.int64())
    cols["nll"] = pa.array(res["nll"] if n else [], pa.float64())
    if "prompt_fit" in res:
        fit = np.asarray(res["prompt_fit"], dtype=np.float64)
        cols["prompt_fit"] = pa.array(fit, pa.float64(), mask=~np.isfinite(fit))
    return pa.table(cols)


def stored_sketches(table: pa.Table) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """An index table's sketches [n, dim] in their stored dtype (no copy), the int8 rows' scales (binary: [s, ‖x‖])
    and, centered, each row's ⟨G, μ⟩."""
    flat = table["sketch"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    scale, norm, center_dot = (table[c].to_numpy() if c in table.column_names else None
                               for c in ("sketch_scale", "sketch_norm", "center_dot"))
    return flat.reshape(table.num_rows, -1), scale if norm is None else np.stack([scale, norm], 1), center_dot


def write_rejected(out: str, key: str, rejected: list[tuple[str, str]]) -> None:
    """A shard's rejected rows (id, reason): written before its part."""
    io.write_table_atomic(RunOutput(out).part("rejected", key),
                          pa.table({"id": pa.array([r[0] for r in rejected], pa.string()),
                                    "reason": pa.array([r[1] for r in rejected], pa.string())}))


def write_part(out: str, kind: str, key: str, table: pa.Table, meta: dict) -> None:
    """A shard's part with its counts in the footer: its existence marks the shard done, so it goes last."""
    write_with_meta(RunOutput(out).part(kind, key), table, meta)


def write_with_meta(url: str, table: pa.Table, meta: dict) -> None:
    io.write_table_atomic(url, table.replace_schema_metadata({PART_META: json.dumps(meta)}))


def part_meta(url: str) -> dict:
    """A part's footer counts, read without its data."""
    fs, path = io.filesystem(url)
    return json.loads(pq.read_schema(path, filesystem=fs).metadata[PART_META])


# ---- the run's summary ----------------------------------------------------------------------------------------------


def write_run_json(spec: RunSpec, done_before: set[str], tally: dict | None, t0: float, extra: dict,
                   faults: dict | None = None) -> dict:
    """OUT/run.json of a pass over ``spec``: counts over the whole output (a resumed run too), plus provenance: this
    invocation's ``tally`` (from executor.run_shards; None: nothing ran) plus the footers of the shards finished
    before it (none read on a run that did not resume)."""
    out, shards = spec.out, spec.shards
    tally = tally or {"shards": 0, **dict.fromkeys(RUN_COUNTS, 0)}
    counts = {k: tally[k] for k in RUN_COUNTS}
    for key in shards.only(done_before).keys() if done_before else ():
        meta = part_meta(out.part(spec.kind, key))
        for k in RUN_COUNTS:
            counts[k] += meta.get(k, 0)
    wall = time.time() - t0
    run = {"command": spec.command, "config": spec.config, "counts": {**counts, "shards": len(shards)},
           "this_invocation": {"shards": tally["shards"], "wall_seconds": round(wall, 3),
                               "rows_per_second": round((tally["scored"] + tally["rejected"]) / max(wall, 1e-9), 3),
                               **(faults or {"nodes_lost": [], "retried_shards": [], "shards_per_node": {}})},
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "forvalue_ray": __version__, **extra}
    out.save_run(run)
    return run


def print_run_summary(command: str, out: RunOutput, run: dict) -> None:
    c = run["counts"]
    print(f"{command}: {c['scored']:,} rows scored, {c['rejected']:,} rejected, {c['tokens']:,} tokens "
          f"in {c['shards']} shards; {run['this_invocation']['wall_seconds']:.1f} s this run → {out.root}",
          file=sys.stderr)
    if c.get("truncated_rows"):
        print(f"{command}: {c['truncated_rows']:,} rows truncated at max_length, {c['truncated_tokens']:,} tokens "
              f"dropped (--max-length, or --overlong reject)", file=sys.stderr)
    inv = run["this_invocation"]
    if inv["nodes_lost"] or inv["retried_shards"]:
        print(f"{command}: survived {len(inv['nodes_lost'])} lost Ray nodes; {len(inv['retried_shards'])} shards "
              f"redone (run.json: this_invocation)", file=sys.stderr)
