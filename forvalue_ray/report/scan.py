"""The report's one pass over an output: the top and bottom rows, a uniform sample for the plots, exact per-target
summaries and the rejection reasons, in bounded memory."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import io
from ..job.parts import PART_META, SELECTION

DEFAULT_TOP = 15
DEFAULT_SAMPLE = 5000
MAX_REASONS = 30  # distinct rejection reasons listed; the rest are counted as "other"
REASON_EXAMPLES = 3
MAX_GROUP_CURVES = 12  # groups drawn in the distribution figure
MAX_TARGET_ROWS = 50  # per-target summary rows shown (pairwise)


@dataclass
class Ranked:
    """The top (or bottom) N rows seen so far: value, id, shard, n_tokens, nll and the score vector."""

    n: int
    largest: bool
    cols: dict = field(default_factory=dict)

    def add(self, part: dict) -> None:
        cols = part if not self.cols else {k: np.concatenate([self.cols[k], part[k]]) for k in part}
        sign = -1.0 if self.largest else 1.0
        order = np.lexsort((cols["id"], sign * cols["value"]))[: self.n]  # ties: by id, as `select`
        self.cols = {k: v[order] for k, v in cols.items()}

    def rows(self) -> list[dict]:
        return [{k: v[i] for k, v in self.cols.items()} for i in range(len(self.cols.get("id", [])))]


@dataclass
class Sample:
    """A uniform sample of at most ``size`` rows of a stream: the rows with the smallest seeded random keys."""

    size: int
    rng: np.random.Generator
    cols: dict = field(default_factory=dict)

    def add(self, part: dict) -> None:
        part = {**part, "key": self.rng.random(len(part["value"]))}
        cols = part if not self.cols else {k: np.concatenate([self.cols[k], part[k]]) for k in part}
        if len(cols["key"]) > self.size:
            keep = np.argpartition(cols["key"], self.size - 1)[: self.size]
            cols = {k: v[keep] for k, v in cols.items()}
        self.cols = cols


@dataclass
class Summary:
    """Exact running count, mean, std, min and max of every score column."""

    names: list
    count: int = 0
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def add(self, mat: np.ndarray) -> None:
        if not len(mat):
            return
        if self.total is None:
            k = mat.shape[1]
            self.total, self.squares = np.zeros(k), np.zeros(k)
            self.low, self.high = np.full(k, np.inf), np.full(k, -np.inf)
        self.count += len(mat)
        self.total += mat.sum(0)
        self.squares += (mat * mat).sum(0)
        self.low, self.high = np.minimum(self.low, mat.min(0)), np.maximum(self.high, mat.max(0))

    def table(self) -> list[dict]:
        if not self.count:
            return []
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean * mean, 0.0))
        return [{"target": n, "mean": mean[i], "std": std[i], "min": self.low[i], "max": self.high[i]}
                for i, n in enumerate(self.names)]


@dataclass
class Scan:
    top: Ranked
    bottom: Ranked
    sample: Sample
    summary: Summary
    rejected: dict = field(default_factory=dict)  # reason category → [count, [(id, reason), …]]
    n_rows: int = 0
    n_parts: int = 0


def _read_table(url: str, columns=None) -> pa.Table:
    fs, path = io.filesystem(url)
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def _maybe_json(url: str):
    return io.read_json(url) if io.exists(url) else None


def _resolved_config(out: str) -> dict | None:
    """config.resolved.yaml: every setting, written when the run finished."""
    import yaml

    url = io.join(out, "config.resolved.yaml")
    if not io.exists(url):
        return None
    fs, path = io.filesystem(url)
    with fs.open(path, "r") as fh:
        return yaml.safe_load(fh)


def reason_category(reason: str) -> str:
    """The kind of a rejection reason: its text before any detail after a colon, numbers as N."""
    return re.sub(r"\d+", "N", reason.split(": ", 1)[0]).strip() or "(no reason)"


def _add_rejected(found: dict, table: pa.Table, prefix: str = "") -> None:
    for rid, reason in zip(table["id"].to_pylist(), table["reason"].to_pylist()):
        cat = prefix + reason_category(reason or "")
        if cat not in found and len(found) >= MAX_REASONS:
            cat = "other"
        entry = found.setdefault(cat, [0, []])
        entry[0] += 1
        if len(entry[1]) < REASON_EXAMPLES:
            entry[1].append((rid, reason))


def scan_scores(out: str, shards: list, names: list, top_n: int, sample_size: int, seed: int) -> Scan:
    """One pass over the finished score parts, in plan order; rejected parts only where a part's footer
    counts rejected rows."""

    scan = Scan(Ranked(top_n, True), Ranked(top_n, False), Sample(sample_size, np.random.default_rng(seed)),
                Summary(list(names)))
    done = io.list_parts(io.join(out, "scores"))
    for shard in shards:
        key = shard.key
        if key not in done:
            continue
        table = _read_table(io.join(out, "scores", key + ".parquet"))
        meta = json.loads((table.schema.metadata or {}).get(PART_META, b"{}"))
        if meta.get("rejected"):
            _add_rejected(scan.rejected, _read_table(io.join(out, "rejected", key + ".parquet")))
        scan.n_parts += 1
        if not table.num_rows:
            continue
        if "score" in table.column_names:
            mat = table["score"].to_numpy(zero_copy_only=False)[:, None]
        else:
            mat = np.asarray(table["scores"].to_pylist(), dtype=np.float64).reshape(table.num_rows, -1)
        _add_part(scan, {"id": np.asarray(table["id"].to_pylist(), dtype=object),
                         "value": mat.mean(1), "scores": mat, "shard": np.full(table.num_rows, key, dtype=object),
                         "n_tokens": table["n_tokens"].to_numpy(zero_copy_only=False).astype(np.float64),
                         "nll": table["nll"].to_numpy(zero_copy_only=False)})
    return scan


def scan_selection(out: str, top_n: int, sample_size: int, seed: int) -> Scan:
    """A ``select`` output: its ``_selection/<shard>.parquet`` parts (id, score of the selected rows)."""
    scan = Scan(Ranked(top_n, True), Ranked(top_n, False), Sample(sample_size, np.random.default_rng(seed)),
                Summary(["score"]))
    for key in sorted(io.list_parts(io.join(out, SELECTION))):
        table = _read_table(io.join(out, SELECTION, key + ".parquet"))
        scan.n_parts += 1
        if not table.num_rows:
            continue
        value = table["score"].to_numpy(zero_copy_only=False)
        _add_part(scan, {"id": np.asarray(table["id"].to_pylist(), dtype=object), "value": value,
                         "scores": value[:, None], "shard": np.full(len(value), key, dtype=object),
                         "n_tokens": np.full(len(value), np.nan), "nll": np.full(len(value), np.nan)})
    return scan


def _add_part(scan: Scan, part: dict) -> None:
    scan.n_rows += len(part["value"])
    scan.summary.add(part["scores"])
    scan.top.add(part)
    scan.bottom.add(part)
    scan.sample.add({"value": part["value"], "scores": part["scores"][:, :MAX_GROUP_CURVES],  # bounded width
                     "n_tokens": part["n_tokens"], "nll": part["nll"]})
