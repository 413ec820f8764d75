"""The target pass: the target rows encoded on the driver, their statistics (or tokens, pairwise) computed by model
actors block by block and reduced in a fixed order, then saved as OUT/target (or OUT/center) and broadcast."""

from __future__ import annotations

import sys

import pyarrow as pa

from .. import io
from . import executor
from .parts import RunOutput
from .spec import Model, Reading, TargetSpec
from .steps import EncodeShards, TargetWorker, encode_summary


def encode_target(target: TargetSpec, reading: Reading, model: Model) -> dict:
    """The target rows read and encoded on the driver (the same reading, encoding and row routing as the training
    rows'; ``target.group_column``: groups mode's); raises, saying why, when no row is valid."""
    encoder = EncodeShards(model.path, reading.encode_kw, target.group_column, model.trust_remote_code)
    rows, groups, rejected, group_names, columns = [], [], [], set(), {}
    for shard in io.plan_shards(target.rows, reading.format, reading.shard_rows, reading.shard_bytes,
                                exclude=reading.exclude):
        enc = encoder.encode(shard)
        rows += enc["rows"]
        groups += ["mean" if g is None else g for g in enc["groups"]]
        rejected += enc["rejected"]
        group_names |= enc["group_names"]
        columns.update(dict.fromkeys(enc["columns"]))
    if not rows:
        raise ValueError(no_valid_rows(target.rows, rejected, list(columns), target.group_column))
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


def build_target(enc: dict, target: TargetSpec, model: Model, out: RunOutput):
    """The target pass over the encoded rows ``enc`` (of ``target.rows``): model actors compute one additive partial per
    fixed block of target rows (or keep its tokens, pairwise); blocks are reduced in float64 in block order by Ray
    tasks, so the result is bit-identical for any number of actors and the statistics ([K, V, d]) never pass
    through the driver process: the last task, on the driver's node, saves the artifact and holds the broadcast. A
    target row whose statistics overflow (not finite) is rejected with its reason, like a row that cannot be
    encoded, and left out of the statistics. ``target.dense``: statistics to be centered (centering subtracts dense
    ones). Returns (payload ref, target ids, info); the artifact goes to OUT/<target.artifact>/."""
    rows, groups, rejected, group_names = enc["rows"], enc["groups"], list(enc["rejected"]), enc["group_names"]
    rejected_url = out.artifact_rejected(target.artifact)
    names = sorted(set(groups))
    size = model.target_block_rows
    blocks = [list(range(i, min(i + size, len(rows)))) for i in range(0, len(rows), size)]
    pool = executor.ActorPool(TargetWorker, (model.path, model.load_kw, model.vocab_chunk, model.batch_tokens),
                              model.resources, min(model.actors[1], len(blocks)))
    info = {}
    if target.mode == "pairwise":
        calls = [pool.submit(b, "reference", [rows[i] for i in block], block[0], num_returns=2)
                 for b, block in enumerate(blocks)]
    else:
        from ..engine import target_form

        index = [names.index(g) for g in groups]
        stats_form = "dense" if target.dense else target_form(
            sum(r.n_valued for r in rows), len(names), *executor.get(pool.submit(0, "head_shape")))
        info["target_stats_form"] = stats_form
        calls = [pool.submit(b, "partial", [rows[i] for i in block], [index[i] for i in block], len(names),
                             target.normalize, stats_form, block[0], num_returns=2) for b, block in enumerate(blocks)]
    overflowed = [bad for _, bad_ref in calls for bad in executor.get(bad_ref)]  # (row, id, reason): a few
    rejected += [(rid, reason) for _, rid, reason in overflowed]
    if rejected:
        io.write_table_atomic(rejected_url, pa.table({"id": pa.array([r[0] for r in rejected], pa.string()),
                                                      "reason": pa.array([r[1] for r in rejected], pa.string())}))
    dropped = {i for i, _, _ in overflowed}
    kept = [i for i in range(len(rows)) if i not in dropped]
    if not kept:
        pool.close(wait_for=None)
        raise ValueError(f"no valid target rows in {target.rows} ({len(rejected)} rejected: see {rejected_url})")
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
    if target.mode == "pairwise":
        payload = executor.on_driver_node(_join_references, *refs)
    else:
        provenance = {**model.provenance, "model_fingerprint": model.fingerprint}
        payload = executor.on_driver_node(_finish_target, executor.fold(_add_partials, refs), names,
                                          target.normalize, provenance, out.artifact(target.artifact))
    pool.close(wait_for=payload)  # free their model replicas before the value pass starts its own
    return payload, ([rows[i].id for i in kept] if target.mode == "pairwise" else kept_names), info


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


