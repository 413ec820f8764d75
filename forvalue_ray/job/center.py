"""Centering: μ, the target pass over a seeded random sample of the training rows (or an earlier run's, reused),
saved as OUT/center with the sample and its provenance."""

from __future__ import annotations

import json
import random

import pyarrow as pa

from .. import io
from ..encode import Encoder
from ..io import Shards
from ..sketch import center_id
from .parts import RunOutput
from .spec import Model, Reading
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


def build_center(shards: Shards, rows: int | None, seed: int, reused: str | None, model: Model, reading: Reading,
                 out: RunOutput, train_files: list, normalize: bool):
    """μ for --center: the target pass over a seeded random sample of ``rows`` training rows (of --data,
    sketching), saved under OUT/center/ with the sample itself (sample.parquet or .jsonl) and its provenance
    (sample.json, with ``train_files``: the sampled input's stamp); or the statistics of an earlier run's sample
    (``reused``: --center-stats). Returns (payload, info)."""
    from ..artifacts import check_compatible, load_target_stats

    if reused:
        stats = load_target_stats(reused)
        check_compatible("--center-stats", {"model_fingerprint": model.fingerprint}, stats.provenance)
        return {"stats": stats}, {"center_rows": sum(stats.counts)}
    sample, read = sample_training_rows(shards, rows, seed)
    sampled = [row for _, row in sample]
    if any(s.fmt in ("jsonl", "json") for s in shards.only(read)):
        path = out.center_sample("jsonl")
        io.write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sampled).encode())
    else:
        path = out.center_sample("parquet")
        io.write_table_atomic(path, pa.Table.from_pylist(sampled))
    enc = Encoder(None, columns=reading.columns)
    out.save_center_sample_meta({
        "requested_rows": rows, "seed": seed, "rows": len(sampled), "shards_read": read,
        "ids": [enc.row_id(row, fallback) for fallback, row in sample], "train_files": train_files})
    sample_reading = Reading(reading.encode_kw, reading.columns, "auto", reading.shard_rows, reading.shard_bytes,
                             reading.exclude)
    payload, _, info = build_target(encode_target(path, sample_reading, model, None), path, model, out, mode="mean",
                                    normalize=normalize, dense=True, artifact="center")
    return payload, {"center_rows": info["target_rows"], "center_rejected": info["target_rejected"]}


def center_payload(target: dict, center: dict) -> dict:
    from ..center import center_target_stats

    return {"stats": center_target_stats(target["stats"], center["stats"])}


def center_summary(payload: dict) -> dict:
    mu = payload["stats"].stats[0]
    return {"id": center_id(mu), "rows": payload["stats"].counts[0], "sq_norm": float(mu.double().pow(2).sum())}
