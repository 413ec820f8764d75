"""Centering: μ, the target pass over a seeded random sample of the training rows (or an earlier run's, reused),
saved as OUT/center with the sample and its provenance."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pyarrow as pa

from .. import io
from ..encode import Encoder
from ..io import Shards
from ..sketch import center_id
from ..subspace import Subspace, parse_shape
from . import executor
from .spec import RunSpec, TargetSpec
from .target import build_target, encode_target

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


def build_center(spec: RunSpec):
    """μ for the run's centering (``spec.center``): the target pass over a seeded random sample of ``rows`` rows of
    the input, saved under OUT/center/ with the sample itself (sample.parquet or .jsonl) and its provenance
    (sample.json, with ``train_files``: the sampled input's stamp); or the statistics of an earlier run's sample
    (``reused``: --center-stats). ``subspace`` (sketch --subspace K1xK2): the index's subspace fitted on the same
    sample and saved beside μ; a reused sample brings the one saved with it. Returns (payload, info)."""
    from ..artifacts import check_compatible, load_subspace, load_target_stats

    center, model, reading, out = spec.center, spec.model, spec.reading, spec.out
    if center.reused:
        stats = load_target_stats(center.reused)
        check_compatible("--center-stats", {"model_fingerprint": model.fingerprint}, stats.provenance)
        payload, found = {"stats": stats}, load_subspace(center.reused)
        if center.subspace and (found is None or (found.vocab.shape[0], found.hidden.shape[0])
                                != parse_shape(center.subspace)):
            have = "none" if found is None else f"{found.vocab.shape[0]}x{found.hidden.shape[0]}"
            raise ValueError(f"--subspace {center.subspace}: --center-stats {center.reused} holds {have}; an index "
                             "and its target index share the subspace saved with μ: drop --subspace to use it")
        if found is not None:
            payload["subspace"] = found
        return payload, {"center_rows": sum(stats.counts), **subspace_info(found)}
    sample, read = sample_training_rows(spec.shards, center.rows, center.seed)
    sampled = [row for _, row in sample]
    if any(s.fmt in ("jsonl", "json") for s in spec.shards.only(read)):
        path = out.center_sample("jsonl")
        io.write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sampled).encode())
    else:
        path = out.center_sample("parquet")
        io.write_table_atomic(path, pa.Table.from_pylist(sampled))
    enc = Encoder(None, columns=reading.columns)
    out.save_center_sample_meta({
        "requested_rows": center.rows, "seed": center.seed, "rows": len(sampled), "shards_read": read,
        "ids": [enc.row_id(row, fallback) for fallback, row in sample], "train_files": center.train_files})
    target = TargetSpec(path, "mean", None, spec.normalize, dense=True, artifact="center")
    enc = encode_target(target, replace(reading, format="auto"), model)
    payload, _, info = build_target(enc, target, model, out)
    fitted = None
    if center.subspace:
        from ..artifacts import save_subspace

        fit = executor.ray_task(fit_center_subspace, model.resources)
        fitted = executor.get(fit.remote(payload, enc["rows"], model.path, model.load_kw, parse_shape(center.subspace),
                                         model.vocab_chunk, model.batch_tokens))
        save_subspace(fitted, out.artifact("center"))
        payload = executor.on_driver_node(_with_subspace, payload, fitted)
    return payload, {"center_rows": info["target_rows"], "center_rejected": info["target_rejected"],
                     **subspace_info(fitted)}


def fit_center_subspace(payload: dict, rows: list, model_path: str, load_kw: dict, shape: tuple[int, int],
                        vocab_chunk: int, batch_tokens: int) -> Subspace:
    """The index's subspace, fitted on the centering sample's rows by a model replica (a task with a replica's
    resources: one forward of at most FIT_COLUMNS // k2 rows)."""
    from ..engine import fit_subspace_on_rows
    from .steps import load_replica

    vm = load_replica(model_path, load_kw)
    return fit_subspace_on_rows(vm, rows, payload["stats"].stats[0], *shape, vocab_chunk, batch_tokens).to("cpu")


def _with_subspace(payload: dict, subspace: Subspace) -> dict:
    return {**payload, "subspace": subspace}


def subspace_info(subspace: Subspace | None) -> dict:
    if subspace is None:
        return {}
    return {"subspace": {"shape": [subspace.vocab.shape[0], subspace.hidden.shape[0]], "id": subspace.id()}}


def center_payload(target: dict, center: dict) -> dict:
    from ..center import center_target_stats

    return {"stats": center_target_stats(target["stats"], center["stats"])}


def center_summary(payload: dict) -> dict:
    """μ's identity, rows and ‖μ‖². With a subspace, the identity names both: an index and its target index pair
    only on the same μ and the same subspace."""
    mu, sub = payload["stats"].stats[0], payload.get("subspace")
    ident = center_id(mu) if sub is None else f"{center_id(mu)}+{sub.id()}"
    return {"id": ident, "rows": payload["stats"].counts[0], "sq_norm": float(mu.double().pow(2).sum())}
