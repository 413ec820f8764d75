"""Per-shard work, with no Ray in it: each step reads a shard (or its parts), computes, writes that shard's outputs
atomically and returns a small summary. The executor runs the classes as actors (they hold a tokenizer or a model
replica) and the functions as tasks; a test can call any of them directly.

- value / sketch: :class:`EncodeShards` (CPU: read + tokenize, bad rows aside) → :class:`ScoreShards` (GPU: score
  or sketch, write the shard's parts);
- score: :class:`ScoreSketches` (an index part against the target sketches);
- target pass: :class:`TargetWorker` (a model replica computing one partial per block of target rows);
- verify: :func:`check_shard`; select: :func:`group_stats`, :func:`counts_at_or_above`, :func:`candidates`,
  :func:`union_counts`, :func:`rows_by_id`, :func:`write_selected`, :func:`selection_counts`.
"""

from __future__ import annotations

import json
import pickle
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import io
from ..center import center_terms
from ..encode import Columns, Encoder, RowError
from ..io import Shard
from ..sketch import score_sketches
from . import parts


def make_encoder(model_path: str, encode_kw: dict, trust_remote_code: bool = False) -> Encoder:
    """The row encoder for a model directory: its tokenizer, or its processor for image-text models."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from ..model import context_length

    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    vocab = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "vocab_size", None)
    encode_kw = {**encode_kw, "max_length": encode_kw.get("max_length") or context_length(cfg)}
    if hasattr(cfg, "vision_config"):
        from ..vision import VisionEncoder

        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        return VisionEncoder(processor, vocab_size=vocab, **encode_kw)
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return Encoder(tok, vocab_size=vocab, **{k: v for k, v in encode_kw.items() if k != "image_column"})


def encode_summary(encoded: list) -> dict:
    """Rows cut at max_length and the tokens they lost (reported in run.json and on the console)."""
    cut = [r.truncated for r in encoded if r.truncated]
    return {"truncated_rows": len(cut), "truncated_tokens": int(sum(cut))}


def load_replica(model_path: str, load_kw: dict):
    """A model replica on this worker's device: its GPU(s) when given any, else the CPU."""
    import torch

    from ..model import load_model

    cuda = torch.cuda.is_available() and load_kw.get("gpus", 0) > 0
    kw = {k: v for k, v in load_kw.items() if k != "gpus"}
    if cuda and load_kw.get("gpus", 0) > 1:
        kw["device_map"] = "auto"  # a model larger than one GPU spans the actor's GPUs
    return load_model(model_path, device="cuda" if cuda else "cpu", identify=False, **kw)  # the driver identified it


READ_RETRY_S = 1.0  # before reading a shard that failed once again, to tell a damaged file from a transient error


def _summaries(results: list[dict]) -> dict:
    return {k: [r[k] for r in results] for k in results[0]}


class EncodeShards:
    """Read a shard and turn its rows into token ids + loss masks, routing bad rows aside (a CPU actor)."""

    def __init__(self, tokenizer_path: str, encode_kw: dict, group_column: str | None, trust_remote_code: bool):
        self.encoder = make_encoder(tokenizer_path, encode_kw, trust_remote_code)
        self.group_column = group_column

    def __call__(self, batch):
        return {**{f: batch[f] for f in io.SHARD_FIELDS},
                "payload": [pickle.dumps(self.encode_or_fail(s)) for s in io.shards_from_columns(batch)]}

    def encode_or_fail(self, shard: Shard) -> dict:
        """The shard encoded, or {"error": why} when reading it fails the same way twice (a damaged file: every
        retry would fail alike, so the job stops at once naming the file); a read that fails once (a network
        error) raises, and the shard is redone in the next round."""
        try:
            return self.encode(shard)
        except Exception as first:  # noqa: BLE001 - told apart below: deterministic or not
            time.sleep(READ_RETRY_S)
            try:
                return self.encode(shard)
            except Exception as second:  # noqa: BLE001
                if type(second) is not type(first) or str(second) != str(first):
                    raise
                return {"error": f"cannot read {shard.path}: {type(second).__name__}: {second} (a damaged or "
                                 f"unreadable file fails the same way on every retry: fix or remove it, or "
                                 f"point the job at the files to use)"}

    def encode(self, shard: Shard) -> dict:
        rows, rejected = io.read_shard(shard)
        n_read = len(rows) + len(rejected)
        encoded, groups, seen, group_names, columns = [], [], set(), set(), {}
        for fallback, row in rows:
            columns.update(dict.fromkeys(row))
            rid = self.encoder.row_id(row, fallback)
            try:
                if rid in seen:
                    raise RowError("duplicate id within its shard")
                group = None
                if self.group_column:
                    group = row.get(self.group_column)
                    if group is None:
                        raise RowError(f"missing group column '{self.group_column}'")
                    group_names.add(str(group))
                enc = self.encoder(row, fallback)
            except RowError as e:
                rejected.append((rid, str(e)))
                continue
            seen.add(rid)
            encoded.append(enc)
            groups.append(None if group is None else str(group))
        return {"rows": encoded, "groups": groups, "rejected": rejected, "n_read": n_read,
                "group_names": group_names, "columns": list(columns)}


class ScoreShards:
    """One model replica (a GPU actor): scores (or sketches) whole encoded shards and writes their parts.
    ``broadcast`` holds the scorer's target side: {"stats": TargetStats} or {"reference": ReferenceTokens}; for a
    centered index, {"stats": μ}."""

    def __init__(self, model_path: str, load_kw: dict, scorer_kw: dict, broadcast: dict | None, out: str, kind: str,
                 mode: str = "mean", group_column: str | None = None, storage: str = "float32"):
        from ..engine import Scorer

        self.vm = load_replica(model_path, load_kw)
        extra = broadcast or {}
        self.scorer = Scorer(self.vm, **scorer_kw, **extra)
        self.out, self.kind, self.mode, self.group_column, self.storage = out, kind, mode, group_column, storage
        self.seed = scorer_kw.get("sketch_seed", 0)
        # a centered index: the scorer's statistics are μ; rows keep TS(G) − TS(μ) and ⟨G, μ⟩
        self.center = (center_terms(extra["stats"].stats[0], self.scorer.hashes)
                       if kind == "sketches" and "stats" in extra else None)

    def __call__(self, batch):
        return _summaries([self.score(s, pickle.loads(p))
                           for s, p in zip(io.shards_from_columns(batch), batch["payload"])])

    def score(self, shard: Shard, enc: dict) -> dict:
        t0 = time.time()
        if "error" in enc:  # unreadable: nothing written, the driver stops the job naming the file
            return {"shard": shard.key, "label": shard.label, "error": enc["error"], "seconds": 0.0}
        rows = enc["rows"]
        res = self.scorer(rows) if rows else {}
        if rows:  # a row whose numbers overflowed is rejected, never written as NaN
            finite = np.all([np.isfinite(v.reshape(len(rows), -1)).all(1) for v in res.values()], axis=0)
            if not finite.all():
                enc["rejected"] += [(r.id, "non-finite result: numerical overflow in the model (try float32, "
                                    "bfloat16 or another --attn-implementation)") for r, ok in zip(rows, finite)
                                   if not ok]
                rows = [r for r, ok in zip(rows, finite) if ok]
                enc["groups"] = [g for g, ok in zip(enc["groups"], finite) if ok]  # aligned with the kept rows
                res = {k: v[finite] for k, v in res.items()}
        table = parts.result_table(self.kind, [r.id for r in rows], res, self.mode, self.storage, self.seed,
                                   self.center)
        if self.group_column:  # a sketch index keeps the group labels that `score --mode groups` needs
            table = table.append_column(self.group_column, pa.array(enc["groups"], pa.string()))
        meta = {"shard": shard.key, "rows_read": enc["n_read"], "scored": len(rows),
                "rejected": len(enc["rejected"]), "tokens": int(res["n_tokens"].sum()) if rows else 0,
                **encode_summary(rows)}
        parts.write_rejected(self.out, shard.key, enc["rejected"])
        parts.write_part(self.out, self.kind, shard.key, table, meta)
        return {**meta, "label": shard.label, "error": "", "seconds": time.time() - t0}


class ScoreSketches:
    """Scores of one index part against the target sketches (a CPU actor of the score pass)."""

    def __init__(self, targets, out: str, mode: str):
        self.targets = targets  # SketchTargets
        self.out, self.mode = out, mode

    def __call__(self, batch):
        return _summaries([self.score(s) for s in io.shards_from_columns(batch)])

    def score(self, shard: Shard) -> dict:
        t0 = time.time()
        fs, path = io.filesystem(shard.path)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            columns = [c for c in ("id", "sketch", "sketch_scale", "center_dot", "n_tokens", "nll")
                       if c in pf.schema_arrow.names]
            table = pf.read_row_groups(list(range(shard.start, shard.stop)), columns=columns)
        n = table.num_rows
        values, scale, center_dot = parts.stored_sketches(table)
        res = {"n_tokens": table["n_tokens"].to_numpy(), "nll": table["nll"].to_numpy(),
               "scores": score_sketches(values, scale, self.targets, center_dot)}
        out = parts.result_table("scores", table["id"].to_pylist(), res, self.mode)
        meta = {"shard": shard.key, "rows_read": n, "scored": n, "rejected": 0, "tokens": int(res["n_tokens"].sum())}
        parts.write_rejected(self.out, shard.key, [])
        parts.write_part(self.out, "scores", shard.key, out, meta)
        return {**meta, "seconds": time.time() - t0}


class TargetWorker:
    """A model replica of the target pass: one additive partial (or the reference tokens) per block of target rows."""

    def __init__(self, model_path, load_kw, vocab_chunk, max_tokens):
        self.vm = load_replica(model_path, load_kw)
        self.kw = {"vocab_chunk": vocab_chunk, "max_tokens": max_tokens}

    def head_shape(self) -> tuple[int, int]:
        return tuple(self.vm.head.weight.shape)

    def partial(self, rows, group_index, n_groups, normalize, stats_form, first_row: int = 0):
        """((sum, counts), rejected): rows whose statistics overflow are left out and returned as
        (row index, id, reason) (two results: the driver fetches the small second one only)."""
        from ..engine import target_partial

        rejected: list = []
        total = target_partial(self.vm, rows, group_index, n_groups, normalize=normalize, stats_form=stats_form,
                               rejected=rejected, first_row=first_row, **self.kw)
        return total, rejected

    def reference(self, rows, first_row: int):
        from ..engine import build_reference

        rejected: list = []
        ref = build_reference(self.vm, rows, rejected=rejected, first_row=first_row, **self.kw).to("cpu")
        return (ref, first_row), rejected


# ---- verify ---------------------------------------------------------------------------------------------------------


def check_shard(shard: Shard, out: str, kind: str) -> dict:
    """One finished shard: footer counts against its parts and its input rows, finite values."""
    fs, path = io.filesystem(parts.RunOutput(out).part(kind, shard.key))
    part = pq.read_table(path, filesystem=fs)
    meta = json.loads(part.schema.metadata[parts.PART_META])
    rejected = io.filesystem(parts.RunOutput(out).part("rejected", shard.key))[1]
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
    return {"counts": {k: meta.get(k, 0) for k in parts.COUNTS}, "problems": problems}


def _count_jsonl_rows(shard: Shard) -> int:
    fs, path = io.filesystem(shard.path)
    return sum(1 for _, line in io._jsonl_lines(fs, path, shard.start, shard.stop) if line.strip())


# ---- select ---------------------------------------------------------------------------------------------------------
#
# A *lane* is what one cut is found for: (group, column[, probe]) where column indexes the values a row is ranked by
# (one column, or one per target for --combine round-robin). Lanes travel as tuples to the tasks and come back as
# JSON lists.

COMBINES = ("max", "round-robin")


def score_matrix(scores: pa.Table) -> np.ndarray:
    """[n, K] every target's score of each row (K = 1 for a mean-mode score)."""
    if "score" in scores.column_names:
        return np.asarray(scores["score"].to_numpy(), dtype=np.float64).reshape(-1, 1)
    n = scores.num_rows
    if not n:
        return np.zeros((0, 1))
    return np.asarray(pc.list_flatten(scores["scores"]).to_numpy(), dtype=np.float64).reshape(n, -1)


def ranked_values(scores: pa.Table, target: int | None, combine: str | None = None) -> np.ndarray:
    """The value each row is ranked by: its score (mean mode), one target's column, the max over targets
    (``combine="max"``) or the mean over targets. (Round-robin ranks by every column: :func:`lane_values`.)"""
    if "score" in scores.column_names:
        return np.asarray(scores["score"].to_numpy(), dtype=np.float64)
    mat = score_matrix(scores)
    if target is not None:
        return mat[:, target]
    return mat.max(1) if combine in COMBINES else mat.mean(1)


def lane_values(scores: pa.Table, target: int | None, combine: str | None) -> np.ndarray:
    """[n, L]: the columns lanes rank by: every target's (round-robin), else the one ranked value."""
    if combine == "round-robin":
        return score_matrix(scores)
    return ranked_values(scores, target, combine).reshape(-1, 1)


def shard_keys(shard: Shard, scores_dir: str, id_column: str, per_group: str | None, target: int | None,
               combine: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """The scored rows of one shard: ids, the [n, L] values ranked, n_tokens, and (per group) each row's group."""
    fs, path = io.filesystem(parts.RunOutput(scores_dir).part("scores", shard.key))
    scores = pq.read_table(path, filesystem=fs)
    ids = np.asarray(scores["id"].to_pylist(), dtype=str) if scores.num_rows else np.zeros(0, dtype=str)
    values = lane_values(scores, target, combine)
    tokens = (np.asarray(scores["n_tokens"].to_numpy(), dtype=np.int64) if "n_tokens" in scores.column_names
              else np.zeros(len(ids), np.int64))
    if not per_group:
        return ids, values, tokens, [None] * len(ids)
    enc = Encoder(None, columns=Columns(id=id_column))
    group_of = {enc.row_id(row, fb): row.get(per_group) for fb, row in io.read_shard(shard)[0]}
    return ids, values, tokens, [_group_key(group_of.get(i)) for i in ids.tolist()]


def _group_key(g) -> str | None:
    return None if g is None else json.dumps(g, sort_keys=True, default=str)


def _rows_by_group(groups: list) -> dict:
    out: dict = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return {g: np.asarray(v, dtype=np.int64) for g, v in out.items()}


def group_stats(shard: Shard, **keys_kw) -> dict:
    """Per lane (group, column): the shard's row count, lowest and highest value, and tokens."""
    ids, values, tokens, groups = shard_keys(shard, **keys_kw)
    out = []
    for g, rows in _rows_by_group(groups).items():
        for c in range(values.shape[1]):
            v = values[rows, c]
            out.append([g, c, len(rows), float(v.min()), float(v.max()), int(tokens[rows].sum())])
    return {"lanes": out}


def counts_at_or_above(shard: Shard, edges: dict, **keys_kw) -> dict:
    """Per lane: how many of the shard's rows, and how many tokens, lie at or above each edge, within the lane's
    interval."""
    ids, values, tokens, groups = shard_keys(shard, **keys_kw)
    by_group = _rows_by_group(groups)
    out = []
    for lane, (lo, hi, cut_edges) in edges.items():
        rows = by_group.get(lane[0], np.zeros(0, np.int64))
        v, t = values[rows, lane[1]], tokens[rows]
        inside = (v >= lo) & (v <= hi)
        order = np.argsort(v[inside], kind="stable")
        v, t = v[inside][order], t[inside][order]
        above = np.concatenate([np.cumsum(t[::-1])[::-1], [0]])  # above[i]: tokens of v[i:]
        at = np.searchsorted(v, cut_edges, side="left")
        out.append([list(lane), (len(v) - at).tolist(), above[at].tolist()])
    return {"counts": out}


def candidates(shard: Shard, intervals: dict, **keys_kw) -> dict:
    """The shard's rows (lane, value, id, n_tokens) whose value lies in their lane's interval."""
    ids, values, tokens, groups = shard_keys(shard, **keys_kw)
    by_group = _rows_by_group(groups)
    out = []
    for lane, (lo, hi) in intervals.items():
        rows = by_group.get(lane[0], np.zeros(0, np.int64))
        v = values[rows, lane[1]]
        for r in rows[(v >= lo) & (v <= hi)]:
            out.append([list(lane), float(values[r, lane[1]]), str(ids[r]), int(tokens[r])])
    return {"rows": out}


def is_before(v: float, rid: str, cut) -> bool:
    """(v, rid) at or before the cut in (score desc, id asc) order; a cut [v, id, False] excludes its own row."""
    if cut is None or cut == "all":
        return cut == "all"
    inclusive = cut[2] if len(cut) > 2 else True
    return v > cut[0] or (v == cut[0] and (rid <= cut[1] if inclusive else rid < cut[1]))


def before_mask(v: np.ndarray, ids: np.ndarray, cut) -> np.ndarray:
    """:func:`is_before` for arrays of rows."""
    if cut is None or cut == "all":
        return np.full(len(v), cut == "all")
    inclusive = cut[2] if len(cut) > 2 else True
    same = v == cut[0]
    if not same.any():
        return v > cut[0]
    return (v > cut[0]) | (same & ((ids <= cut[1]) if inclusive else (ids < cut[1])))


def union_counts(shard: Shard, cuts: dict, **keys_kw) -> dict:
    """Per (group, probe): rows (and tokens) of the shard before the cut of any of its lanes (group, column,
    probe) — the size of a round-robin's first rounds."""
    ids, values, tokens, groups = shard_keys(shard, **keys_kw)
    by_group = _rows_by_group(groups)
    masks: dict = {}
    for (g, c, p), cut in cuts.items():
        rows = by_group.get(g, np.zeros(0, np.int64))
        m = before_mask(values[rows, c], ids[rows], cut)
        masks[(g, p)] = masks[(g, p)] | m if (g, p) in masks else m
    return {"counts": [[g, p, int(m.sum()), int(tokens[by_group.get(g, np.zeros(0, np.int64))][m].sum())]
                       for (g, p), m in masks.items()]}


def rows_by_id(shard: Shard, wanted: dict, **keys_kw) -> dict:
    """The shard's rows among ``wanted`` (group → ids): group, id, every column's value, n_tokens."""
    ids, values, tokens, groups = shard_keys(shard, **keys_kw)
    out = []
    for i, (rid, g) in enumerate(zip(ids.tolist(), groups)):
        if rid in wanted.get(g, ()):
            out.append([g, rid, values[i].tolist(), int(tokens[i])])
    return {"rows": out}


def chosen_mask(ids, values, groups, cuts: dict, bottom: bool, extras: dict | None = None) -> np.ndarray:
    """The shard's rows a selection keeps: before the cut of any of their group's lanes (after the cut: bottom),
    or named in ``extras`` (group → ids: a round-robin's last, partial round)."""
    chosen = np.zeros(len(ids), bool)
    by_group = _rows_by_group(groups)
    for lane, cut in cuts.items():
        rows = by_group.get(lane[0])
        if rows is not None:
            chosen[rows] |= before_mask(values[rows, lane[1]], ids[rows], cut)
    if bottom:
        chosen = ~chosen
    for g, named in (extras or {}).items():
        rows = by_group.get(g)
        if rows is not None and named:
            chosen[rows] |= np.isin(ids[rows], np.asarray(list(named), dtype=str))
    return chosen


def _shard_table(shard: Shard) -> tuple[pa.Table, int]:
    """A Parquet or Arrow shard's rows as one Arrow table (the input's own types) and its first row's index."""
    fs, path = io.filesystem(shard.path)
    with fs.open(path, "rb") as fh:
        if shard.fmt == "arrow":
            return pa.ipc.open_stream(fh).read_all().slice(shard.start, shard.stop - shard.start), shard.start
        pf = pq.ParquetFile(fh)
        first = sum(pf.metadata.row_group(g).num_rows for g in range(shard.start))
        return pf.read_row_groups(list(range(shard.start, shard.stop))), first


def write_selected(shard: Shard, out: str, cuts: dict, bottom: bool, extras: dict | None = None,
                   **keys_kw) -> dict:
    """Filter one input shard by its own score part; write its chosen rows in the input's format (Parquet and
    Arrow: the shard's Arrow table filtered, every column keeping its type; JSONL: its lines), then its selection
    part (id, score), the shard's commit marker."""
    ids, values, tokens, groups = shard_keys(shard, **keys_kw)
    mask = chosen_mask(ids, values, groups, cuts, bottom, extras)
    shown = values.max(1) if values.shape[1] > 1 else values[:, 0]
    chosen = set(ids[mask].tolist())
    id_column = keys_kw["id_column"]
    stem = shard.label.rsplit(".", 1)[0].replace("/", "__") + f"-{shard.key}"
    written = 0
    if chosen and shard.fmt in ("jsonl", "json"):
        enc = Encoder(None, columns=Columns(id=id_column))
        keep, seen = [], set()
        for fb, row in io.read_shard(shard)[0]:
            rid = enc.row_id(row, fb)
            if rid in chosen and rid not in seen:  # a repeated id was rejected by the job: skip it too
                seen.add(rid)
                keep.append(row)
        if keep:
            io.write_bytes_atomic(io.join(out, stem + ".jsonl"),
                                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep).encode())
        written = len(keep)
    elif chosen:
        table, first = _shard_table(shard)
        column = table[id_column].to_pylist() if id_column in table.column_names else [None] * table.num_rows
        row_ids = [f"{shard.label}:{first + i}" if v is None else str(v) for i, v in enumerate(column)]
        keep, seen = np.zeros(len(row_ids), bool), set()
        for i, rid in enumerate(row_ids):
            if rid in chosen and rid not in seen:  # a repeated id was rejected by the job: skip it too
                seen.add(rid)
                keep[i] = True
        table = table.filter(pa.array(keep))
        if table.num_rows:
            io.write_table_atomic(io.join(out, stem + ".parquet"), table)
        written = table.num_rows
    order = np.lexsort((ids[mask], -shown[mask])) if mask.any() else np.zeros(0, np.int64)
    counts = {"selected": int(mask.sum()), "written": written, "tokens": int(tokens[mask].sum())}
    part = pa.table({"id": pa.array(ids[mask][order].tolist(), pa.string()),
                     "score": pa.array(shown[mask][order].tolist(), pa.float64())})
    parts.write_with_meta(parts.RunOutput(out).part(parts.SELECTION, shard.key), part, counts)
    return counts


def selection_counts(shard: Shard, out: str) -> dict:
    """A shard selected by an earlier, interrupted run: its counts from its selection part's footer."""
    meta = parts.part_meta(parts.RunOutput(out).part(parts.SELECTION, shard.key))
    return {"selected": meta["selected"], "written": meta["written"], "tokens": meta.get("tokens", 0)}
