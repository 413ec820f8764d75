"""The commands as passes over shards: ``value``, ``sketch`` and ``score`` (streaming, resumable, exactly once).
A job's config is resolved once (:func:`.spec.resolve`); each pass then reads one way — plan → prepare → target
(:mod:`.target`, :mod:`.center`) → stream (:mod:`.steps` through :mod:`.executor`) → finish (OUT/run.json) — handing
each step the resolved values it needs. The math is in the core (:mod:`forvalue_ray.engine`,
:mod:`forvalue_ray.sketch`); ``verify`` is :mod:`.verification`.
"""

from __future__ import annotations

import posixpath
import time

from .. import __version__, io
from ..sketch import sketch_targets
from . import executor, parts
from .center import build_center, center_payload, center_summary
from .config import JobConfig
from .spec import RunSpec, resolve
from .steps import EncodeShards, ScoreShards, ScoreSketches
from .target import build_target, encode_target


def run(cfg: JobConfig) -> dict:
    """Run a value / sketch / score job to completion (or resume it); returns its run.json."""
    spec = resolve(cfg)
    result = {"value": run_value, "sketch": run_sketch, "score": run_score}[spec.command](spec)
    spec.out.save_resolved_config({k: v for k, v in spec.config.items() if k != "extra"})
    parts.print_run_summary(spec.command, spec.out, result)
    counts = result["counts"]
    if spec.command in ("value", "sketch") and counts["scored"] == 0:
        raise RuntimeError(nothing_scored(spec, counts))
    return result


def nothing_scored(spec: RunSpec, counts: dict) -> str:
    """Why a run scored no row: its commonest rejection reasons (from a few rejected parts) and the columns found."""
    import collections

    import pyarrow.parquet as pq

    reasons: collections.Counter = collections.Counter()
    fs, base = io.filesystem(spec.out.parts_dir("rejected"))
    names = sorted(fs.ls(base, detail=False))[:20] if fs.exists(base) else []
    for f in names:
        if f.endswith(".parquet") and not posixpath.basename(f).startswith("."):
            reasons.update(pq.read_table(f, filesystem=fs, columns=["reason"])["reason"].to_pylist())
    top = "; ".join(f"{n}× {r}" for r, n in reasons.most_common(2)) or "none rejected"
    columns = input_columns(spec.shards)
    return (f"no row was scored ({counts['rows_read']:,} read, {counts['rejected']:,} rejected: {top}); columns "
            f"found: {', '.join(columns) or 'none'}. Name the row's columns (--text-column, --prompt-column/"
            f"--response-column, --messages-column, --form) and re-run; rejected rows and their reasons: "
            f"{spec.out.parts_dir('rejected')}")


def input_columns(shards, rows: int = 100) -> list[str]:
    """The columns of an input's first shard (the keys of its first rows, for JSON)."""
    try:
        found = {}
        for _, row in io.read_shard(shards[0])[0][:rows]:
            found.update(dict.fromkeys(row))
        return list(found)
    except Exception:  # an explanation's detail: never the error itself
        return []


def _stream(spec: RunSpec, done: set[str], scorer_kw: dict, broadcast) -> tuple[dict, dict]:
    """The shards not done, each read and encoded (CPU actors), then scored or sketched (model actors)."""
    model, group_col = spec.model, spec.group_column if spec.kind == "sketches" else None
    encode = executor.Stage(EncodeShards, {"tokenizer_path": model.path, "encode_kw": spec.reading.encode_kw,
                                           "group_column": group_col, "trust_remote_code": model.trust_remote_code,
                                           "prompt_fit_column": spec.prompt_fit_column},
                            (1, max(1, model.actors[1])), {"num_cpus": 0.5})
    score = executor.Stage(ScoreShards, {"model_path": model.path, "load_kw": model.load_kw, "scorer_kw": scorer_kw,
                                         "broadcast": broadcast, "out": spec.out.root, "kind": spec.kind,
                                         "mode": spec.mode, "group_column": group_col,
                                         "prompt_fit": spec.prompt_fit_column is not None,
                                         **({"storage": spec.sketch["storage"]} if spec.sketch else {})},
                           model.actors, model.resources)
    return executor.run_shards(spec.command, spec.shards, done, [encode, score], spec.progress)


# ---- value ----------------------------------------------------------------------------------------------------------


def run_value(spec: RunSpec) -> dict:
    """``forvalue-ray value``: target pass (or a reused artifact), then one score per training row."""
    from ..artifacts import check_compatible, load_target_stats

    t0 = time.time()
    model, out = spec.model, spec.out
    # the target is checked before the plan is written: a typo fails with nothing to replace
    encoded = encode_target(spec.target, spec.reading, model) if spec.target else None
    done = parts.prepare_out(out, spec.plan, spec.shards, spec.overwrite)
    info = {"model": model.provenance, "model_fingerprint": model.fingerprint, "mode": spec.mode}
    tally = faults = None
    if not spec.shards.without(done) and out.has_run():
        prev = out.load_run()  # finished: no target pass, no actors
        info.update({k: prev.get(k) for k in ("target_rows", "target_rejected", "center_rows")})
    else:
        executor.init_ray(spec.ray_address)
        if spec.target_stats:
            stats = load_target_stats(spec.target_stats)
            check_compatible("--target-stats", {"model_fingerprint": model.fingerprint}, stats.provenance)
            if stats.normalize != spec.normalize:
                raise ValueError(f"--target-stats was built with normalize={stats.normalize}; pass the same "
                                 "--normalize")
            target_ids, target_info = stats.names, {"target_rows": sum(stats.counts), "target_rejected": None,
                                                    "target_stats_form": stats.form}
            payload = {"stats": stats}
        else:
            payload, target_ids, target_info = build_target(encoded, spec.target, model, out)
        if spec.center:
            center, center_info = build_center(spec)
            payload = executor.on_driver_node(center_payload, payload, center)
            target_info.update(center_info)
        out.save_targets(target_ids)
        scorer_kw = {"normalize": spec.normalize, "vocab_chunk": model.vocab_chunk, "max_tokens": model.batch_tokens}
        tally, faults = _stream(spec, done, scorer_kw, executor.broadcast(payload))
        info.update(target_info)
    return parts.write_run_json(spec, done, tally, t0, info, faults)


# ---- sketch and score -----------------------------------------------------------------------------------------------


def run_sketch(spec: RunSpec) -> dict:
    """``forvalue-ray sketch``: per-row TensorSketches written as an index; with --center / --center-stats, centered
    on μ (each row keeps TS(G) − TS(μ) and ⟨G, μ⟩; index.json records μ's identity and ‖μ‖²)."""
    t0 = time.time()
    model, out = spec.model, spec.out
    index_meta = {**spec.sketch, "model_fingerprint": model.fingerprint, "model": model.provenance,
                  "group_column": spec.group_column, "center_id": None, "forvalue_ray": __version__}
    done = parts.prepare_out(out, spec.plan, spec.shards, spec.overwrite)
    executor.init_ray(spec.ray_address)
    payload, info = None, {}
    if spec.center:
        center, info = build_center(spec)
        payload = executor.broadcast(center)
        summary = executor.get(executor.on_driver_node(center_summary, payload))  # μ itself stays off the driver
        index_meta.update(center_id=summary["id"], center={
            **summary, "artifact": spec.center.reused or out.artifact("center")}, subspace=info.get("subspace"))
        info.update(center_id=summary["id"])
    out.save_index(index_meta)
    scorer_kw = {"sketch_dim": spec.sketch["dim"], "sketch_seed": spec.sketch["seed"],
                 "vocab_chunk": model.vocab_chunk, "max_tokens": model.batch_tokens}
    tally, faults = _stream(spec, done, scorer_kw, payload)
    return parts.write_run_json(spec, done, tally, t0,
                                {"model": model.provenance, "model_fingerprint": model.fingerprint, **info}, faults)


def run_score(spec: RunSpec) -> dict:
    """``forvalue-ray score``: target statistics from a target index, scores for every row of an index."""
    t0 = time.time()
    meta, tmeta = spec.index_meta, spec.target_index_meta
    targets = io.read_parts(parts.RunOutput(spec.target_index).parts_dir("sketches"))
    target_ids = targets["id"].to_pylist()
    if spec.mode == "pairwise":
        labels = ids = [str(i) for i in range(len(target_ids))]  # a column per row, even if two share an id
    elif spec.mode == "groups":
        if spec.group_column not in targets.column_names:
            raise ValueError(f"the target index has no column '{spec.group_column}': build it with "
                             f"`forvalue-ray sketch --group-column {spec.group_column}`")
        labels = [str(g) for g in targets[spec.group_column].to_pylist()]
        ids = sorted(set(labels))
    else:
        labels, ids = ["mean"] * len(target_ids), ["mean"]
    values, scale, center_dot = parts.stored_sketches(targets)
    columns = sketch_targets(values, scale, labels, ids, normalize=spec.normalize, center_dot=center_dot,
                             center_sq_norm=(tmeta.get("center") or {}).get("sq_norm", 0.0))
    ids = target_ids if spec.mode == "pairwise" else ids
    done = parts.prepare_out(spec.out, spec.plan, spec.shards, spec.overwrite)
    spec.out.save_targets(ids)
    executor.init_ray(spec.ray_address)
    stage = executor.Stage(ScoreSketches, {"targets": executor.broadcast(columns), "out": spec.out.root,
                                           "mode": spec.mode},
                           spec.actors, {"num_cpus": 0.5})
    tally, faults = executor.run_shards(spec.command, spec.shards, done, [stage], spec.progress)
    return parts.write_run_json(spec, done, tally, t0,
                                {"model": meta.get("model"), "model_fingerprint": meta["model_fingerprint"]}, faults)
