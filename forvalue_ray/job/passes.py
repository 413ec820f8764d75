"""The commands as passes over shards: ``value``, ``sketch`` and ``score`` (streaming, resumable, exactly once)
and ``verify``. Each pass plans its shards, prepares the output, broadcasts what its workers need and hands
:mod:`.steps` to :mod:`.executor`; the math is in the core (:mod:`forvalue_ray.engine`, :mod:`forvalue_ray.sketch`).
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import sys
import time

import pyarrow as pa

from .. import __version__, io
from ..encode import Encoder
from ..io import Shards
from ..sketch import center_id, sketch_targets
from . import executor, parts
from .config import JobConfig, actor_range
from .steps import EncodeShards, ScoreShards, ScoreSketches, TargetWorker, check_shard, encode_summary


def run(cfg: JobConfig) -> dict:
    """Run a value / sketch / score job to completion (or resume it); returns its run.json."""
    runner = {"value": run_value, "sketch": run_sketch, "score": run_score}[cfg.command]
    result = runner(cfg)
    parts.write_resolved_config(cfg)
    parts.print_run_summary(cfg, result)
    counts = result["counts"]
    if cfg.command in ("value", "sketch") and counts["scored"] == 0:
        raise RuntimeError(nothing_scored(cfg, counts))
    return result


def nothing_scored(cfg: JobConfig, counts: dict) -> str:
    """Why a run scored no row: its commonest rejection reasons (from a few rejected parts) and the columns found."""
    import collections

    import pyarrow.parquet as pq

    reasons: collections.Counter = collections.Counter()
    fs, base = io.filesystem(io.join(cfg.out, "rejected"))
    names = sorted(fs.ls(base, detail=False))[:20] if fs.exists(base) else []
    for f in names:
        if f.endswith(".parquet") and not posixpath.basename(f).startswith("."):
            reasons.update(pq.read_table(f, filesystem=fs, columns=["reason"])["reason"].to_pylist())
    top = "; ".join(f"{n}× {r}" for r, n in reasons.most_common(2)) or "none rejected"
    return (f"no row was scored ({counts['rows_read']:,} read, {counts['rejected']:,} rejected: {top}); columns "
            f"found: {', '.join(input_columns(cfg.scored_data, cfg.format, cfg.out)) or 'none'}. Name the "
            f"row's columns (--text-column, --prompt-column/--response-column, --messages-column, --form) and re-run; "
            f"rejected rows and their reasons: {io.join(cfg.out, 'rejected')}")


def input_columns(url: str, fmt: str = "auto", exclude: str | None = None, rows: int = 100) -> list[str]:
    """The columns of an input's first shard (the keys of its first rows, for JSON)."""
    try:
        shard = io.plan_shards(url, fmt, exclude=exclude)[0]
        found = {}
        for _, row in io.read_shard(shard)[0][:rows]:
            found.update(dict.fromkeys(row))
        return list(found)
    except Exception:  # an explanation's detail: never the error itself
        return []


def _model_identity(cfg: JobConfig) -> tuple[str, dict, str]:
    """The loadable model path (GGUF converted once, here on the driver), its provenance and fingerprint."""
    from ..model import adapter_provenance, model_fingerprint, resolve_model

    model_path, provenance = resolve_model(cfg.model, cfg.revision)
    provenance.update(adapter_provenance(cfg.adapter))
    provenance["dtype"] = cfg.dtype or ("bfloat16" if cfg.gpus_per_actor else "float32")  # as the actors load it
    return model_path, provenance, model_fingerprint(provenance)


def _artifact(path: str | None):
    """A reused artifact's identity in the plan: its content (see artifacts.artifact_identity)."""
    from ..artifacts import artifact_identity

    return artifact_identity(path) if path else None


def _prepare(cfg: JobConfig, kind: str, shards: Shards, extra: dict) -> tuple[dict, set[str]]:
    record = parts.plan_record(kind, {**cfg.result_fields(), **extra}, shards)
    return record, parts.prepare_out(cfg.out, record, shards, cfg.overwrite)


def _model_stages(cfg: JobConfig, model_path: str, scorer_kw: dict, broadcast, kind: str) -> list[executor.Stage]:
    group_col = cfg.group_column if kind == "sketches" else None
    encode = executor.Stage(EncodeShards, {"tokenizer_path": model_path, "encode_kw": cfg.encode_kw(),
                                           "group_column": group_col, "trust_remote_code": cfg.trust_remote_code},
                            (1, max(1, actor_range(cfg.num_actors)[1])), {"num_cpus": 0.5})
    layout = {"storage": cfg.storage} if kind == "sketches" else {"mode": cfg.mode}  # a sketch config has no mode
    score = executor.Stage(ScoreShards, {"model_path": model_path, "load_kw": cfg.load_kw(), "scorer_kw": scorer_kw,
                                         "broadcast": broadcast, "out": cfg.out, "kind": kind, **layout,
                                         "group_column": group_col},
                           actor_range(cfg.num_actors), cfg.actor_resources())
    return [encode, score]


def _run_stages(cfg: JobConfig, shards: Shards, done: set[str], stages: list) -> tuple[dict, dict]:
    return executor.run_shards(cfg.command, shards, done, stages, cfg.progress)


# ---- value ----------------------------------------------------------------------------------------------------------


def run_value(cfg: JobConfig) -> dict:
    """``forvalue-ray value``: target pass (or a reused artifact), then one score per training row."""
    from ..artifacts import check_compatible, load_target_stats

    t0 = time.time()
    cfg.validate()
    model_path, provenance, fp = _model_identity(cfg)
    shards = io.plan_shards(cfg.train, cfg.format, cfg.shard_rows, cfg.shard_bytes, exclude=cfg.out)
    # reused artifacts by content: one rebuilt in place is another job, never mixed into this one's outputs
    target_id = (parts.file_stamp(cfg.target, exclude=cfg.out) if cfg.target and not cfg.target_stats
                 else _artifact(cfg.target_stats))
    # the model and the target are checked before the plan is written: a typo fails with nothing to replace
    target = encode_target(cfg, model_path) if cfg.target and not cfg.target_stats else None
    _, done = _prepare(cfg, "scores", shards, {"model_fingerprint": fp, "target": target_id,
                                               "train_files": parts.file_stamp(cfg.train, exclude=cfg.out),
                                               "center": _artifact(cfg.center_stats)})
    info = {"model": provenance, "model_fingerprint": fp, "mode": cfg.mode}
    if not shards.without(done) and io.exists(io.join(cfg.out, "run.json")):
        prev = io.read_json(io.join(cfg.out, "run.json"))  # finished: no target pass, no actors
        return parts.write_run_json(cfg, "scores", shards, done, None, t0, {
            **info, **{k: prev.get(k) for k in ("target_rows", "target_rejected", "center_rows")}})
    executor.init_ray(cfg.ray_address)
    scorer_kw = {"normalize": cfg.normalize, "vocab_chunk": cfg.vocab_chunk, "max_tokens": cfg.batch_tokens}
    if cfg.target_stats:
        stats = load_target_stats(cfg.target_stats)
        check_compatible("--target-stats", {"model_fingerprint": fp}, stats.provenance)
        if stats.normalize != cfg.normalize:
            raise ValueError(f"--target-stats was built with normalize={stats.normalize}; pass the same --normalize")
        target_ids, target_info = stats.names, {"target_rows": sum(stats.counts), "target_rejected": None,
                                                "target_stats_form": stats.form}
        payload = {"stats": stats}
    else:
        payload, target_ids, target_info = build_target(cfg, model_path, provenance, fp, encoded=target)
    if cfg.center or cfg.center_stats:
        center, center_info = build_center(cfg, model_path, provenance, fp, shards)
        payload = executor.on_driver_node(_center_payload, payload, center)
        target_info.update(center_info)
    parts.write_targets(cfg.out, target_ids)
    stages = _model_stages(cfg, model_path, scorer_kw, executor.broadcast(payload), "scores")
    tally, faults = _run_stages(cfg, shards, done, stages)
    return parts.write_run_json(cfg, "scores", shards, done, tally, t0, {**info, **target_info}, faults)


# ---- the target pass ------------------------------------------------------------------------------------------------

# target rows per partial: fixed, so the reduce order never depends on the actors (tests set a smaller one
# through the environment, which their job subprocesses inherit)
TARGET_BLOCK_ROWS = int(os.environ.get("FORVALUE_TARGET_BLOCK_ROWS", "64"))


def encode_target(cfg: JobConfig, model_path: str) -> dict:
    """The target rows read and encoded on the driver (the same reading, encoding and row routing as the training
    rows'); raises, saying why, when no row is valid."""
    encoder = EncodeShards(model_path, cfg.encode_kw(), cfg.group_column if cfg.mode == "groups" else None,
                           cfg.trust_remote_code)
    rows, groups, rejected, group_names, columns = [], [], [], set(), {}
    for shard in io.plan_shards(cfg.target, cfg.format, cfg.shard_rows, cfg.shard_bytes, exclude=cfg.out):
        enc = encoder.encode(shard)
        rows += enc["rows"]
        groups += ["mean" if g is None else g for g in enc["groups"]]
        rejected += enc["rejected"]
        group_names |= enc["group_names"]
        columns.update(dict.fromkeys(enc["columns"]))
    if not rows:
        raise ValueError(no_valid_rows(cfg.target, rejected, list(columns), cfg.group_column if cfg.mode == "groups"
                                       else None))
    return {"rows": rows, "groups": groups, "rejected": rejected, "group_names": group_names}


def no_valid_rows(what: str, rejected: list, columns: list[str], group_column: str | None) -> str:
    import collections

    if not rejected:
        return f"no target rows: {what} holds no rows"
    found = ", ".join(map(repr, columns)) or "none"
    if group_column and group_column not in columns:
        return (f"no valid target rows in {what}: it has no column '{group_column}' (--group-column); its columns "
                f"are {found}")
    top = "; ".join(f"{n}× {r}" for r, n in collections.Counter(r for _, r in rejected).most_common(2))
    return f"no valid target rows in {what} ({len(rejected)} rejected: {top}); its columns are {found}"


def build_target(cfg: JobConfig, model_path: str, provenance: dict, fp: str, artifact: str = "target",
                 encoded: dict | None = None):
    """The target pass: encode the (small) target set on the driver; model actors compute one additive
    partial per fixed block of target rows (or keep its tokens, pairwise); blocks are reduced in float64 in
    block order by Ray tasks, so the result is bit-identical for any number of actors and the statistics
    ([K, V, d]) never pass through the driver process: the last task, on the driver's node, saves the artifact and
    holds the broadcast. A target row whose statistics overflow (not finite) is rejected with its reason, like a
    row that cannot be encoded, and left out of the statistics.
    Returns (payload ref, target ids, info); the artifact goes to OUT/<artifact>/."""
    enc = encoded or encode_target(cfg, model_path)
    rows, groups, rejected, group_names = enc["rows"], enc["groups"], list(enc["rejected"]), enc["group_names"]
    rejected_url = io.join(cfg.out, artifact, "rejected.parquet")
    names = sorted(set(groups))
    blocks = [list(range(i, min(i + TARGET_BLOCK_ROWS, len(rows)))) for i in range(0, len(rows), TARGET_BLOCK_ROWS)]
    pool = executor.ActorPool(TargetWorker, (model_path, cfg.load_kw(), cfg.vocab_chunk, cfg.batch_tokens),
                              cfg.actor_resources(), min(actor_range(cfg.num_actors)[1], len(blocks)))
    info = {}
    if cfg.mode == "pairwise":
        calls = [pool.submit(b, "reference", [rows[i] for i in block], block[0], num_returns=2)
                 for b, block in enumerate(blocks)]
    else:
        from ..engine import target_form

        index = [names.index(g) for g in groups]
        stats_form = "dense" if cfg.center or cfg.center_stats else target_form(  # centering subtracts dense statistics
            sum(r.n_valued for r in rows), len(names), *executor.get(pool.submit(0, "head_shape")))
        info["target_stats_form"] = stats_form
        calls = [pool.submit(b, "partial", [rows[i] for i in block], [index[i] for i in block], len(names),
                             cfg.normalize, stats_form, block[0], num_returns=2) for b, block in enumerate(blocks)]
    overflowed = [bad for _, bad_ref in calls for bad in executor.get(bad_ref)]  # (row, id, reason): a few
    rejected += [(rid, reason) for _, rid, reason in overflowed]
    if rejected:
        io.write_table_atomic(rejected_url, pa.table({"id": pa.array([r[0] for r in rejected], pa.string()),
                                                      "reason": pa.array([r[1] for r in rejected], pa.string())}))
    dropped = {i for i, _, _ in overflowed}
    kept = [i for i in range(len(rows)) if i not in dropped]
    if not kept:
        pool.close(wait_for=None)
        raise ValueError(f"no valid target rows in {cfg.target} ({len(rejected)} rejected: see {rejected_url})")
    if overflowed:
        print(f"warning: {len(overflowed)} target row(s) rejected: non-finite statistics (first: "
              f"{overflowed[0][1]!r}; see {rejected_url})", file=sys.stderr)
    kept_names = sorted({groups[i] for i in kept})
    info.update({"target_rows": len(kept), "target_rejected": len(rejected), **{
        f"target_{k}": v for k, v in encode_summary([rows[i] for i in kept]).items()}})
    empty = sorted(group_names - set(kept_names))
    if empty:
        info["target_groups_without_rows"] = empty
        print(f"warning: target group(s) {empty} have no valid row (all rejected: see "
              f"{rejected_url}); they get no score column", file=sys.stderr)
    refs = [ref for ref, _ in calls]
    if cfg.mode == "pairwise":
        payload = executor.on_driver_node(_join_references, *refs)
    else:
        payload = executor.on_driver_node(_finish_target, executor.fold(_add_partials, refs), names, cfg.normalize,
                                          {**provenance, "model_fingerprint": fp}, io.join(cfg.out, artifact))
    pool.close(wait_for=payload)  # free their model replicas before the value pass starts its own
    return payload, ([rows[i].id for i in kept] if cfg.mode == "pairwise" else kept_names), info


def _add_partials(a, b):
    """Partials (sum, counts) in block order; a block whose every row overflowed has no sum (None)."""
    total = b[0] if a[0] is None else a[0] if b[0] is None else a[0] + b[0]
    return total, a[1] + b[1]


def _finish_target(total, names, normalize, provenance, out_dir):
    import torch

    from ..artifacts import save_target_stats
    from ..engine import finish_target_stats

    dtype = torch.float64 if provenance.get("dtype") == "float64" else torch.float32  # fp64 models: fp64 Ḡ
    stats = finish_target_stats(total[0], total[1], names, normalize, provenance, dtype=dtype, drop_empty=True)
    save_target_stats(stats, out_dir)
    return {"stats": stats}


def _join_references(*refs):
    from ..engine import join_references

    return {"reference": join_references(refs)}


# ---- centering ------------------------------------------------------------------------------------------------------


CENTER_MIN_SHARDS = 16


def sample_training_rows(shards: Shards, n: int, seed: int) -> tuple[list[tuple[str, dict]], list[str]]:
    """A seeded random sample of n training rows as (fallback id, row), and the keys of the shards read.
    Shards are read in a seeded random order until they hold n rows and CENTER_MIN_SHARDS shards (or all) were
    read; n of their rows are drawn uniformly. The driver reads about max(n rows, 16 shards), whatever the
    corpus size."""
    rng = random.Random(f"forvalue-center/{seed}")
    pool, read = [], []
    for i in rng.sample(range(len(shards)), len(shards)):
        if len(pool) >= n and len(read) >= min(CENTER_MIN_SHARDS, len(shards)):
            break
        pool += io.read_shard(shards[i])[0]
        read.append(shards[i].key)
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), min(n, len(pool))))], read


def build_center(cfg: JobConfig, model_path: str, provenance: dict, fp: str, shards: Shards):
    """μ for --center: the target pass over a seeded random sample of the training rows (of --data, sketching),
    saved under OUT/center/ with the sample itself (sample.parquet or .jsonl) and its provenance (sample.json); or
    the statistics of an earlier run's sample (--center-stats). Returns (payload, info)."""
    from ..artifacts import check_compatible, load_target_stats

    if cfg.center_stats:
        stats = load_target_stats(cfg.center_stats)
        check_compatible("--center-stats", {"model_fingerprint": fp}, stats.provenance)
        return {"stats": stats}, {"center_rows": sum(stats.counts)}
    sample, read = sample_training_rows(shards, cfg.center, cfg.center_seed)
    rows = [row for _, row in sample]
    if any(s.fmt in ("jsonl", "json") for s in shards.only(read)):
        path = io.join(cfg.out, "center", "sample.jsonl")
        io.write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    else:
        path = io.join(cfg.out, "center", "sample.parquet")
        io.write_table_atomic(path, pa.Table.from_pylist(rows))
    enc = Encoder(None, columns=cfg.columns())
    io.write_json_atomic(io.join(cfg.out, "center", "sample.json"), {
        "requested_rows": cfg.center, "seed": cfg.center_seed, "rows": len(rows), "shards_read": read,
        "ids": [enc.row_id(row, fallback) for fallback, row in sample],
        "train_files": parts.file_stamp(cfg.scored_data, exclude=cfg.out)})
    sample_cfg = cfg.center_sample(path)
    payload, _, info = build_target(sample_cfg, model_path, provenance, fp, artifact="center",
                                    encoded=encode_target(sample_cfg, model_path))
    return payload, {"center_rows": info["target_rows"], "center_rejected": info["target_rejected"]}


def _center_payload(target: dict, center: dict) -> dict:
    from ..api import center_target_stats

    return {"stats": center_target_stats(target["stats"], center["stats"])}


def _center_summary(payload: dict) -> dict:
    mu = payload["stats"].stats[0]
    return {"id": center_id(mu), "rows": payload["stats"].counts[0], "sq_norm": float(mu.double().pow(2).sum())}


# ---- sketch and score -----------------------------------------------------------------------------------------------


def run_sketch(cfg: JobConfig) -> dict:
    """``forvalue-ray sketch``: per-row TensorSketches written as an index; with --center / --center-stats, centered
    on μ (each row keeps TS(G) − TS(μ) and ⟨G, μ⟩; index.json records μ's identity and ‖μ‖²)."""
    t0 = time.time()
    cfg.validate()
    model_path, provenance, fp = _model_identity(cfg)
    shards = io.plan_shards(cfg.data, cfg.format, cfg.shard_rows, cfg.shard_bytes, exclude=cfg.out)
    index_meta = {"dim": cfg.dim, "seed": cfg.seed, "storage": cfg.storage, "model_fingerprint": fp, "model": provenance,
                  "group_column": cfg.group_column, "center_id": None, "forvalue_ray": __version__}
    _, done = _prepare(cfg, "sketches", shards, {"model_fingerprint": fp,
                                                 "data_files": parts.file_stamp(cfg.data, exclude=cfg.out),
                                                 "center": _artifact(cfg.center_stats)})
    executor.init_ray(cfg.ray_address)
    scorer_kw = {"sketch_dim": cfg.dim, "sketch_seed": cfg.seed, "vocab_chunk": cfg.vocab_chunk,
                 "max_tokens": cfg.batch_tokens}
    payload, info = None, {}
    if cfg.center or cfg.center_stats:
        center, info = build_center(cfg, model_path, provenance, fp, shards)
        payload = executor.broadcast(center)
        summary = executor.get(executor.on_driver_node(_center_summary, payload))  # μ itself stays off the driver
        index_meta.update(center_id=summary["id"], center={
            **summary, "artifact": cfg.center_stats or io.join(cfg.out, "center")})
        info.update(center_id=summary["id"])
    io.write_json_atomic(io.join(cfg.out, "index.json"), index_meta)
    tally, faults = _run_stages(cfg, shards, done, _model_stages(cfg, model_path, scorer_kw, payload, "sketches"))
    return parts.write_run_json(cfg, "sketches", shards, done, tally, t0, {"model": provenance, "model_fingerprint": fp,
                                                                         **info}, faults)


def run_score(cfg: JobConfig) -> dict:
    """``forvalue-ray score``: target statistics from a target index, scores for every row of an index."""
    from ..artifacts import check_compatible

    t0 = time.time()
    cfg.validate()
    # indexes from before --storage hold float32; from before centering, raw sketches
    meta = {"storage": "float32", "center_id": None, **io.read_json(io.join(cfg.index, "index.json"))}
    tmeta = {"storage": "float32", "center_id": None, **io.read_json(io.join(cfg.target_index, "index.json"))}
    if meta["center_id"] != tmeta["center_id"]:
        raise ValueError(center_mismatch(cfg, meta, tmeta))
    check_compatible("--target-index", meta, tmeta, ("model_fingerprint", "dim", "seed", "storage"))
    targets = io.read_parts(io.join(cfg.target_index, "sketches"))
    target_ids = targets["id"].to_pylist()
    if cfg.mode == "pairwise":
        labels = ids = [str(i) for i in range(len(target_ids))]  # a column per row, even if two share an id
    elif cfg.mode == "groups":
        if cfg.group_column not in targets.column_names:
            raise ValueError(f"the target index has no column '{cfg.group_column}': build it with "
                             f"`forvalue-ray sketch --group-column {cfg.group_column}`")
        labels = [str(g) for g in targets[cfg.group_column].to_pylist()]
        ids = sorted(set(labels))
    else:
        labels, ids = ["mean"] * len(target_ids), ["mean"]
    values, scale, center_dot = parts.stored_sketches(targets)
    columns = sketch_targets(values, scale, labels, ids, normalize=cfg.normalize, center_dot=center_dot,
                             center_sq_norm=(tmeta.get("center") or {}).get("sq_norm", 0.0))
    ids = target_ids if cfg.mode == "pairwise" else ids
    shards = io.plan_shards(io.join(cfg.index, "sketches"), "parquet", cfg.shard_rows, cfg.shard_bytes)
    _, done = _prepare(cfg, "scores", shards, {"index": meta, "target_index": tmeta,
                                               "target_files": parts.file_stamp(io.join(cfg.target_index, "sketches"))})
    parts.write_targets(cfg.out, ids)
    executor.init_ray(cfg.ray_address)
    stage = executor.Stage(ScoreSketches, {"targets": executor.broadcast(columns), "out": cfg.out, "mode": cfg.mode},
                           actor_range(cfg.num_actors), {"num_cpus": 0.5})
    tally, faults = _run_stages(cfg, shards, done, [stage])
    return parts.write_run_json(cfg, "scores", shards, done, tally, t0, {"model": meta.get("model"),
                                                                      "model_fingerprint": meta["model_fingerprint"]},
                                faults)


def center_mismatch(cfg: JobConfig, meta: dict, tmeta: dict) -> str:
    """Why an index and a target index do not pair by their centering μ, and the command that fixes it."""
    artifact = (meta.get("center") or {}).get("artifact") or io.join(cfg.index, "center")
    rebuild = f"rebuild the target index with `forvalue-ray sketch --center-stats {artifact} ...`"
    if meta["center_id"] and not tmeta["center_id"]:
        return (f"--index {cfg.index} is centered (μ {meta['center_id']}) but --target-index {cfg.target_index} is "
                f"raw (built with --center 0): estimates add up only on the same μ; {rebuild}")
    if tmeta["center_id"] and not meta["center_id"]:
        return (f"--target-index {cfg.target_index} is centered (μ {tmeta['center_id']}) but --index {cfg.index} is "
                f"raw (built with --center 0): rebuild the target index raw (`forvalue-ray sketch --center 0 ...`), "
                f"or center the index (`forvalue-ray sketch` without --center 0) and then the target index on it")
    return (f"--index {cfg.index} and --target-index {cfg.target_index} are centered on different μ "
            f"({meta['center_id']} and {tmeta['center_id']}): estimates add up only on the same μ; {rebuild}")


# ---- verify ---------------------------------------------------------------------------------------------------------


def verify(out: str) -> tuple[list[str], dict]:
    """Problems found (empty when the output is complete and exactly-once) and the counts checked: every shard is
    checked by its own task; the driver aggregates counts only."""
    problems: list[str] = []
    if not io.exists(io.join(out, parts.PLAN_FILE)):
        return [f"{out} has no {parts.PLAN_FILE}: not a forvalue-ray output"], {}
    plan, shards = parts.read_plan(out)
    kind = plan["kind"]
    done, rejected_parts = io.list_parts(io.join(out, kind)), io.list_parts(io.join(out, "rejected"))
    pending = shards.without(done)
    if pending:
        problems.append(f"{len(pending)} of {len(shards)} shards have no {kind} part (first: {pending[0].key}); "
                        f"re-run the same command to finish them")
    finished = shards.only(done)
    unrejected = finished.without(rejected_parts)
    if unrejected:
        problems.append(f"{len(unrejected)} finished shards lack their rejected part (first: {unrejected[0].key})")
    planned = shards.only(done | rejected_parts).keys()
    extra = sorted((done | rejected_parts) - set(planned))
    if extra:
        problems.append(f"{len(extra)} parts belong to no planned shard (first: {extra[0]})")
    fs, base = io.filesystem(out)
    leftovers = [f for f in fs.find(base) if posixpath.basename(f).startswith(".tmp-")]
    if leftovers:
        problems.append(f"{len(leftovers)} unfinished temporary files (first: {leftovers[0]})")
    totals = dict.fromkeys(parts.COUNTS, 0)
    executor.init_ray(None)
    for res in executor.shard_pass(finished, check_shard, out=out, kind=kind):
        for k in parts.COUNTS:
            totals[k] += res["counts"][k]
        problems += res["problems"]
    n_dup, examples = executor.duplicate_ids(out, kind, finished.keys(), totals["scored"])
    if n_dup:
        problems.append(f"{n_dup} ids are scored more than once (e.g. {', '.join(map(repr, examples))}); "
                        f"give rows unique ids, or drop the duplicates from the input")
    if not pending and io.exists(io.join(out, "run.json")):
        counts = io.read_json(io.join(out, "run.json"))["counts"]
        if any(counts.get(k) != v for k, v in totals.items()):
            problems.append(f"run.json counts {counts} disagree with the parts {totals}")
    elif not pending:
        problems.append("run.json is missing: the run did not finish writing its summary")
    return problems, {**totals, "shards": len(shards), "finished_shards": len(finished)}
