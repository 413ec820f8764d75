"""Per-shard work, with no Ray in it: each step reads a shard (or its parts), computes, writes that shard's outputs
atomically and returns a small summary. The executor runs the classes as actors (they hold a tokenizer or a model
replica) and the functions as tasks; a test can call any of them directly.

- value / sketch: :class:`EncodeShards` (CPU: read + tokenize, bad rows aside) → :class:`ScoreShards` (GPU: score
  or sketch, write the shard's parts);
- score: :class:`ScoreSketches` (an index part against the target sketches);
- target pass: :class:`TargetWorker` (a model replica computing one partial per block of target rows);
- verify: :func:`check_shard`. (select's per-shard steps live with the rest of select, in ``selection.py``.)
"""

from __future__ import annotations

import json
import pickle
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import io, promptfit
from ..center import center_terms
from ..encode import Encoder, RowError
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

    def __init__(self, tokenizer_path: str, encode_kw: dict, group_column: str | None, trust_remote_code: bool,
                 prompt_fit_column: str | None = None):
        self.encoder = make_encoder(tokenizer_path, encode_kw, trust_remote_code)
        self.group_column, self.prompt_fit_column = group_column, prompt_fit_column

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
        encoded, groups, seen, group_names, columns, kept = [], [], set(), set(), {}, []
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
            kept.append(row)
            groups.append(None if group is None else str(group))
        out = {"rows": encoded, "groups": groups, "rejected": rejected, "n_read": n_read,
               "group_names": group_names, "columns": list(columns)}
        if self.prompt_fit_column:
            out["swapped"] = self.swapped(kept)
        return out

    def swapped(self, rows: list[dict]) -> list:
        """The shard's valid rows, each with its partner's prompt (promptfit.swapped_rows), encoded; None where it
        has no partner or the swapped row does not encode whole within --max-length."""
        keys = [None if row.get(self.prompt_fit_column) is None else
                json.dumps(row[self.prompt_fit_column], sort_keys=True, default=str) for row in rows]
        out = []
        for row in promptfit.swapped_rows(rows, keys, self.encoder.columns.prompt):
            try:
                out.append(None if row is None else promptfit.whole(self.encoder(row)))
            except RowError:
                out.append(None)
        return out


class ScoreShards:
    """One model replica (a GPU actor): scores (or sketches) whole encoded shards and writes their parts.
    ``broadcast`` holds the scorer's target side: {"stats": TargetStats} or {"reference": ReferenceTokens}; for a
    centered index, {"stats": μ}."""

    def __init__(self, model_path: str, load_kw: dict, scorer_kw: dict, broadcast: dict | None, out: str, kind: str,
                 mode: str = "mean", group_column: str | None = None, storage: str = "float32",
                 prompt_fit: bool = False):
        from ..engine import Scorer

        self.vm = load_replica(model_path, load_kw)
        extra = broadcast or {}
        self.scorer = Scorer(self.vm, **scorer_kw, **extra)
        # prompt fit: the responses' NLL under their partners' prompts, a plain forward (no target side)
        self.nll_scorer = Scorer(self.vm, **{k: v for k, v in scorer_kw.items() if k in ("vocab_chunk", "max_tokens")}
                                 ) if prompt_fit else None
        self.out, self.kind, self.mode, self.group_column, self.storage = out, kind, mode, group_column, storage
        self.seed = scorer_kw.get("sketch_seed", 0)
        # a centered index: the scorer's statistics are μ; rows keep TS(G) − TS(μ) (with a subspace, μ's stored
        # vector is subtracted from [A G Bᵀ, TS(G − Π_A G Π_B)]) and ⟨G, μ⟩
        self.center = (center_terms(extra["stats"].stats[0], self.scorer.hashes, extra.get("subspace"))
                       if kind == "sketches" and "stats" in extra else None)

    def prompt_fits(self, own_nll: np.ndarray, swapped: list) -> np.ndarray:
        """Per row, NLL under its partner's prompt minus NLL under its own; NaN (written as null) where it has no
        partner or that NLL overflows."""
        have = [i for i, r in enumerate(swapped) if r is not None]
        other = np.full(len(own_nll), np.nan)
        if have:
            other[have] = self.nll_scorer([swapped[i] for i in have])["nll"]
        return promptfit.prompt_fit(own_nll, other)

    def __call__(self, batch):
        return _summaries([self.score(s, pickle.loads(p))
                           for s, p in zip(io.shards_from_columns(batch), batch["payload"])])

    def score(self, shard: Shard, enc: dict) -> dict:
        t0 = time.time()
        if "error" in enc:  # unreadable: nothing written, the driver stops the job naming the file
            return {"shard": shard.key, "label": shard.label, "error": enc["error"], "seconds": 0.0}
        rows, swapped = enc["rows"], enc.get("swapped")
        res = self.scorer(rows) if rows else {}
        if rows:  # a row whose numbers overflowed is rejected, never written as NaN
            finite = np.all([np.isfinite(v.reshape(len(rows), -1)).all(1) for v in res.values()], axis=0)
            if not finite.all():
                enc["rejected"] += [(r.id, "non-finite result: numerical overflow in the model (try float32, "
                                    "bfloat16 or another --attn-implementation)") for r, ok in zip(rows, finite)
                                   if not ok]
                rows = [r for r, ok in zip(rows, finite) if ok]
                enc["groups"] = [g for g, ok in zip(enc["groups"], finite) if ok]  # aligned with the kept rows
                swapped = swapped and [r for r, ok in zip(swapped, finite) if ok]
                res = {k: v[finite] for k, v in res.items()}
        if self.nll_scorer is not None:  # the column in every part, an empty one's too: one schema
            res["prompt_fit"] = self.prompt_fits(res["nll"], swapped) if rows else np.zeros(0)
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
            columns = [c for c in ("id", "sketch", "sketch_scale", "sketch_norm", "center_dot", "n_tokens", "nll")
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
