"""The distributed job on Ray Data: plan shards → tokenize (CPU actors) → score (GPU actors) → one part per shard.

The math lives in :mod:`engine`; storage in :mod:`io`. Here: which actor does what, broadcasting the target
artifact, exactly-once parts, resume and progress. A shard's outputs are written by the actor that scored
it, atomically, as ``scores/<shard>.parquet`` (after ``rejected/<shard>.parquet``); a retried task rewrites
the same bytes. Resuming lists finished parts and skips them: O(shards) state.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__, io
from .encode import Columns, Encoder, RowError
from .io import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_ROWS, Shard
from .readout import DEFAULT_VOCAB_CHUNK
from .sketch import (DEFAULT_SKETCH_DIM, STORAGES, center_id, center_terms, compress_sketches, score_sketches,
                     sketch_targets)

MODES = ("mean", "groups", "pairwise")
# `sketch` centers on the mean gradient of this many sampled rows unless told otherwise: at dim 4096 in int8 that
# index met per-target Spearman ≥ 0.95 and AUC within 0.002 of exact where the raw one did not (benchmarks/README.md)
SKETCH_CENTER_ROWS = 1000
PART_META = b"forvalue"


@dataclass
class JobConfig:
    """Every flag of the value / sketch / score commands (YAML job configs use the same keys)."""

    command: str = "value"
    out: str = ""
    # model
    model: str = "smollm2"
    dtype: str | None = None
    adapter: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    # data
    train: str | None = None
    target: str | None = None
    data: str | None = None
    format: str = "auto"
    form: str = "auto"
    id_column: str = "id"
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    images_column: str = "images"
    input_ids_column: str = "input_ids"
    labels_column: str = "labels"
    max_length: int | None = None  # None: the model's context length
    overlong: str = "truncate"
    response_eos: bool = True
    # valuation
    mode: str = "mean"
    group_column: str | None = None
    normalize: bool = False
    target_stats: str | None = None
    center: int | None = None  # centering sample size (rows); 0: not centered; None: the command's default
    center_seed: int = 0
    center_stats: str | None = None
    dim: int = DEFAULT_SKETCH_DIM
    seed: int = 0
    storage: str = "int8"  # sketch index: float32, float16 or int8 (+ one scale per row)
    index: str | None = None
    target_index: str | None = None
    # execution (never changes a result)
    num_actors: str = "1"
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_tokens: int = 4096
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK
    shard_rows: int = DEFAULT_SHARD_ROWS
    shard_bytes: int = DEFAULT_SHARD_BYTES
    ray_address: str | None = None
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    EXECUTION = ("num_actors", "gpus_per_actor", "cpus_per_actor", "batch_tokens", "vocab_chunk", "ray_address",
                 "overwrite", "progress", "extra")

    def __post_init__(self):
        if self.center is None:  # value: the paper's score; sketch: a centered index (see SKETCH_CENTER_ROWS)
            self.center = SKETCH_CENTER_ROWS if self.command == "sketch" and not self.center_stats else 0

    @classmethod
    def from_dict(cls, d: dict) -> "JobConfig":
        names = {f.name for f in fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are the CLI flags: {sorted(names)}")
        return cls(**clean)

    def columns(self) -> Columns:
        return Columns(id=self.id_column, text=self.text_column, prompt=self.prompt_column,
                       response=self.response_column, messages=self.messages_column,
                       input_ids=self.input_ids_column, labels=self.labels_column)

    UNUSED = {"value": ("data", "dim", "seed", "storage", "index", "target_index"),
              "sketch": ("train", "target", "mode", "normalize", "target_stats", "index", "target_index"),
              "score": ("train", "target", "data", "dim", "seed", "storage", "target_stats", "center", "center_seed",
                        "center_stats", "model", "dtype", "adapter",
                        "revision", "format", "form", "max_length", "overlong", "response_eos")}

    def result_fields(self) -> dict:
        """The settings this command's result depends on (execution settings and other commands' flags excluded)."""
        skip = set(self.EXECUTION) | set(self.UNUSED.get(self.command, ()))
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def validate(self) -> None:
        if not self.out:
            raise ValueError("--out is required")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, not {self.mode!r}")
        if self.mode == "groups" and not self.group_column:
            raise ValueError("--mode groups needs --group-column (the target column naming each row's group)")
        if self.command == "value" and not (self.train and (self.target or self.target_stats)):
            raise ValueError("value needs --train and --target (or --target-stats)")
        if self.command == "value" and self.target_stats and self.mode == "pairwise":
            raise ValueError("--target-stats holds mean/group statistics; pairwise mode needs --target")
        if self.command in ("value", "sketch") and (self.center or self.center_stats):
            if self.center < 0 or (self.center and self.center_stats):
                raise ValueError("centering: give --center N (a sample of N training rows, N > 0) or --center-stats "
                                 "DIR (an earlier run's OUT/center), not both")
        if self.command == "value" and (self.center or self.center_stats):
            if self.normalize:
                raise ValueError("--center is defined for the plain For-Value inner product only: drop --normalize "
                                 "or --center")
            if self.mode == "pairwise":
                raise ValueError("--center subtracts the sample's mean gradient from the target statistics of mean "
                                 "or groups mode; pairwise mode keeps no statistics: use --mode mean or groups")
        if self.command == "sketch" and not self.data:
            raise ValueError("sketch needs --data")
        if self.storage not in STORAGES:
            raise ValueError(f"--storage must be one of {STORAGES}, not {self.storage!r}")
        if self.command == "score" and not (self.index and self.target_index):
            raise ValueError("score needs --index and --target-index")
        actor_range(self.num_actors)


def actor_range(spec) -> tuple[int, int]:
    """'4' → (4, 4); '1-8' → (1, 8): a fixed pool or an autoscaling range."""
    text = str(spec)
    lo, _, hi = text.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"--num-actors must be N or MIN-MAX, not {spec!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise ValueError(f"--num-actors must satisfy 1 <= MIN <= MAX, not {spec!r}")
    return lo_i, hi_i


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- Ray stages -----------------------------------------------------------------------------------------------


def _shard_of(batch) -> list[Shard]:
    return io.shards_from_columns(batch)


def make_encoder(model_path: str, encode_kw: dict, trust_remote_code: bool = False) -> Encoder:
    """The row encoder for a model directory: its tokenizer, or its processor for image-text models."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from .model import context_length

    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    vocab = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "vocab_size", None)
    encode_kw = {**encode_kw, "max_length": encode_kw.get("max_length") or context_length(cfg)}
    if hasattr(cfg, "vision_config"):
        from .vision import VisionEncoder

        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        return VisionEncoder(processor, vocab_size=vocab, **encode_kw)
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return Encoder(tok, vocab_size=vocab, **{k: v for k, v in encode_kw.items() if k != "image_column"})


def encode_summary(encoded: list) -> dict:
    """Rows cut at max_length and the tokens they lost (reported in run.json and on the console)."""
    cut = [r.truncated for r in encoded if r.truncated]
    return {"truncated_rows": len(cut), "truncated_tokens": int(sum(cut))}


class EncodeShards:
    """CPU actor: read a shard and turn its rows into token ids + loss masks, routing bad rows aside."""

    def __init__(self, tokenizer_path: str, encode_kw: dict, group_column: str | None, trust_remote_code: bool):
        self.encoder = make_encoder(tokenizer_path, encode_kw, trust_remote_code)
        self.group_column = group_column

    def __call__(self, batch):
        return {**{f: batch[f] for f in io.SHARD_FIELDS}, "payload": [pickle.dumps(self.encode(s))
                                                                    for s in _shard_of(batch)]}

    def encode(self, shard: Shard) -> dict:
        rows, rejected = io.read_shard(shard)
        n_read = len(rows) + len(rejected)
        encoded, groups, seen, group_names = [], [], set(), set()
        for fallback, row in rows:
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
                "group_names": group_names}


def _load(model_path: str, load_kw: dict):
    import torch

    from .model import load_model

    cuda = torch.cuda.is_available() and load_kw.get("gpus", 0) > 0
    kw = {k: v for k, v in load_kw.items() if k != "gpus"}
    if cuda and load_kw.get("gpus", 0) > 1:
        kw["device_map"] = "auto"  # a model larger than one GPU spans the actor's GPUs
    return load_model(model_path, device="cuda" if cuda else "cpu", **kw)


def _maybe_fault():
    """Test hooks: FORVALUE_FAULT_EXIT_ONCE=<marker file> makes the first actor to see it die mid-run;
    FORVALUE_FAULT_SLOW_S=<seconds> (set on one node) makes that node a straggler."""
    time.sleep(float(os.environ.get("FORVALUE_FAULT_SLOW_S", "0")))
    marker = os.environ.get("FORVALUE_FAULT_EXIT_ONCE")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(17)


class ScoreShards:
    """GPU actor: one model replica; scores (or sketches) whole shards and writes their parts."""

    def __init__(self, model_path: str, load_kw: dict, scorer_kw: dict, broadcast, out: str, kind: str,
                 mode: str = "mean", group_column: str | None = None, storage: str = "float32"):
        import ray

        from .engine import Scorer

        self.vm = _load(model_path, load_kw)
        extra = ray.get(broadcast) if broadcast is not None else {}
        self.scorer = Scorer(self.vm, **scorer_kw, **extra)
        self.out, self.kind, self.mode, self.group_column, self.storage = out, kind, mode, group_column, storage
        self.seed = scorer_kw.get("sketch_seed", 0)
        # a centered index: the scorer's statistics are μ; rows keep TS(G) − TS(μ) and ⟨G, μ⟩
        self.center_sketch = (center_terms(extra["stats"].stats[0], self.scorer.hashes)[0]
                              if kind == "sketches" and "stats" in extra else None)

    def __call__(self, batch):
        summaries = [self.score(s, pickle.loads(p)) for s, p in zip(_shard_of(batch), batch["payload"])]
        return {k: [s[k] for s in summaries] for k in summaries[0]}

    def score(self, shard: Shard, enc: dict) -> dict:
        t0 = time.time()
        rows = enc["rows"]
        res = self.scorer(rows) if rows else {}
        if rows:  # a row whose numbers overflowed is rejected, never written as NaN
            finite = np.all([np.isfinite(v.reshape(len(rows), -1)).all(1) for v in res.values()], axis=0)
            if not finite.all():
                enc["rejected"] += [(r.id, "non-finite result: numerical overflow in the model (try float32, "
                                    "bfloat16 or another --attn-implementation)") for r, ok in zip(rows, finite)
                                   if not ok]
                rows = [r for r, ok in zip(rows, finite) if ok]
                res = {k: v[finite] for k, v in res.items()}
        if rows and self.center_sketch is not None:
            res["sketch"] = res["sketch"] - self.center_sketch
        table = result_table(self.kind, [r.id for r in rows], res, self.mode, self.storage, self.seed)
        if self.group_column:  # a sketch index keeps the group labels that `score --mode groups` needs
            table = table.append_column(self.group_column, pa.array(enc["groups"], pa.string()))
        meta = {"shard": shard.key, "rows_read": enc["n_read"], "scored": len(rows),
                "rejected": len(enc["rejected"]), "tokens": int(res["n_tokens"].sum()) if rows else 0,
                **encode_summary(rows)}
        rej = pa.table({"id": pa.array([r[0] for r in enc["rejected"]], pa.string()),
                        "reason": pa.array([r[1] for r in enc["rejected"]], pa.string())})
        io.write_table_atomic(io.join(self.out, "rejected", shard.key + ".parquet"), rej)
        _maybe_fault()
        io.write_table_atomic(io.join(self.out, self.kind, shard.key + ".parquet"),
                              table.replace_schema_metadata({PART_META: json.dumps(meta)}))
        return {**meta, "seconds": time.time() - t0, "node": _node_id()}


def result_table(kind: str, ids: list[str], res: dict, mode: str = "mean", storage: str = "float32",
                 seed: int = 0) -> pa.Table:
    """The output schema: id, score (mean) | scores (groups, pairwise) | sketch [+ sketch_scale: int8, + center_dot:
    centered], n_tokens, nll."""
    n = len(ids)
    cols = {"id": pa.array(ids, pa.string())}
    if kind == "sketches":
        values, scale = compress_sketches(res["sketch"] if n else np.zeros((0, 0), np.float32), storage, ids, seed)
        flat = pa.array(values.reshape(-1))
        cols["sketch"] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1]) if n else pa.array([], pa.list_(
            flat.type))
        if scale is not None:
            cols["sketch_scale"] = pa.array(scale, pa.float32())
        if "scores" in res:  # centered: the exact ⟨G, μ⟩
            cols["center_dot"] = pa.array(res["scores"][:, 0] if n else [], pa.float64())
    elif mode != "mean":
        mat = res.get("pairwise", res.get("scores"))
        cols["scores"] = pa.array(list(mat.astype(np.float64)) if n else [], pa.list_(pa.float64()))
    else:
        cols["score"] = pa.array(res["scores"][:, 0] if n else [], pa.float64())
    cols["n_tokens"] = pa.array(res["n_tokens"] if n else [], pa.int64())
    cols["nll"] = pa.array(res["nll"] if n else [], pa.float64())
    return pa.table(cols)


class ScoreSketches:
    """CPU actor of the score stage: scores of one index part against the broadcast target sketches."""

    def __init__(self, broadcast, out: str, mode: str):
        import ray

        self.targets = ray.get(broadcast)  # SketchTargets
        self.out, self.mode = out, mode

    def __call__(self, batch):
        summaries = [self.score(s) for s in _shard_of(batch)]
        return {k: [s[k] for s in summaries] for k in summaries[0]}

    def score(self, shard: Shard) -> dict:
        fs, path = io.filesystem(shard.path)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            columns = [c for c in ("id", "sketch", "sketch_scale", "center_dot", "n_tokens", "nll")
                       if c in pf.schema_arrow.names]
            table = pf.read_row_groups(list(range(shard.start, shard.stop)), columns=columns)
        n = table.num_rows
        values, scale, center_dot = stored_sketches(table)
        res = {"n_tokens": table["n_tokens"].to_numpy(), "nll": table["nll"].to_numpy(),
               "scores": score_sketches(values, scale, self.targets, center_dot)}
        out = result_table("scores", table["id"].to_pylist(), res, self.mode)
        meta = {"shard": shard.key, "rows_read": n, "scored": n, "rejected": 0, "tokens": int(res["n_tokens"].sum())}
        io.write_table_atomic(io.join(self.out, "rejected", shard.key + ".parquet"),
                              pa.table({"id": pa.array([], pa.string()), "reason": pa.array([], pa.string())}))
        io.write_table_atomic(io.join(self.out, "scores", shard.key + ".parquet"),
                              out.replace_schema_metadata({PART_META: json.dumps(meta)}))
        return {**meta, "seconds": 0.0, "node": _node_id()}


def stored_sketches(table: pa.Table) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """An index table's sketches [n, dim] in their stored dtype (no copy), the int8 rows' scales and, centered,
    each row's ⟨G, μ⟩."""
    flat = table["sketch"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    scale, center_dot = (table[c].to_numpy() if c in table.column_names else None
                         for c in ("sketch_scale", "center_dot"))
    return flat.reshape(table.num_rows, -1), scale, center_dot


# ---- driver ---------------------------------------------------------------------------------------------------


def init_ray(address: str | None):
    """Connect to a cluster (``--ray-address`` / RAY_ADDRESS, set by ``ray job submit``) or start a local one."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # address="local": never attach to another `ray start` cluster on this machine by accident;
            # spare logical CPUs: a pipeline whose actors take every CPU starves the read tasks and hangs
            ray.init(address="local", num_cpus=max(4, (os.cpu_count() or 1) + 2), include_dashboard=False,
                     log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours reports rows/s and tokens/s per shard


class OutputConflict(RuntimeError):
    pass


def prepare_out(cfg: JobConfig, plan_record: dict, shards: list[Shard]) -> set[str]:
    """Create or resume ``--out``; refuse a different job there unless --overwrite. Returns finished shards."""
    plan_url = io.join(cfg.out, io.PLAN_FILE)
    if io.exists(plan_url):
        old = io.read_json(plan_url)
        if "shards" in old:  # the plan of an older version (every shard in the JSON): its fingerprint, recomputed
            old["fingerprint"] = _fingerprint(old.get("settings", {}), [Shard(**s) for s in old.pop("shards")])
            if old["fingerprint"] == plan_record["fingerprint"]:
                io.write_plan(cfg.out, plan_record, shards)
        if old.get("fingerprint") != plan_record["fingerprint"]:
            if not cfg.overwrite:
                changed = sorted(k for k in set(old.get("settings", {})) | set(plan_record["settings"])
                                 if old.get("settings", {}).get(k) != plan_record["settings"].get(k))
                raise OutputConflict(
                    f"{cfg.out} holds a different job (changed: {', '.join(changed) or 'input files'}); "
                    f"use another --out, or --overwrite to replace it")
            io.remove_tree(cfg.out)
        elif cfg.overwrite:
            io.remove_tree(cfg.out)
    if not io.exists(plan_url):
        io.write_plan(cfg.out, plan_record, shards)
    else:
        io.remove_temporaries(cfg.out)  # a writer killed mid-write; its shard is redone below
    return io.list_parts(io.join(cfg.out, plan_record["kind"]))


def _progress(cfg: JobConfig, total: int, done_before: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done_before, unit="shard", file=sys.stderr, disable=not cfg.progress,
                dynamic_ncols=True, desc=cfg.command)


# passes over the shards still without a part: a shard in flight on a lost node's actor fails fast
# (max_task_retries=0) instead of waiting for a restart the cluster may never have room for, and is redone here
SHARD_ROUNDS = 4


def run_shards(cfg: JobConfig, shards: list[Shard], done: set[str], stages: list[tuple]) -> tuple[list[dict], dict]:
    """Stream the unfinished shards through the stages, in rounds until every shard has its part.
    Returns this invocation's per-shard summaries and what it survived (nodes lost, shards retried)."""
    todo = [s for s in shards if s.key not in done]
    summaries: list[dict] = []
    faults = {"nodes_lost": [], "retried_shards": [], "shards_per_node": {}}
    if not todo:
        return summaries, faults
    nodes_before = _alive_nodes()
    bar = _progress(cfg, len(shards), len(shards) - len(todo))
    t0, counted = time.time(), {"rows": 0, "tokens": 0}
    for round_ in range(SHARD_ROUNDS):
        if round_:
            faults["retried_shards"] += [s.key for s in todo]
            print(f"{cfg.command}: retrying {len(todo)} shards that did not finish (first: {todo[0].key})",
                  file=sys.stderr, flush=True)
        summaries += _shard_round(todo, stages, bar, t0, counted)
        finished = {s["shard"] for s in summaries}
        todo = [s for s in todo if s.key not in finished]
        if not todo:
            break
    bar.close()
    faults["nodes_lost"] = sorted(nodes_before - _alive_nodes())
    faults["shards_per_node"] = dict(collections.Counter(s["node"] for s in summaries))
    if todo:
        raise RuntimeError(f"{len(todo)} shards failed {SHARD_ROUNDS} times (first: {todo[0].key}, {todo[0].label}); "
                           f"the Ray logs say why; the finished shards are kept: re-run the same command to retry")
    return summaries, faults


def shards_dataset(shards: list[Shard]):
    """A Ray Dataset of shards, one row each, from a columnar table in at most 10,000 blocks (never a Python dict
    per shard: 10⁶ shards are ~30 MB of Arrow)."""
    import ray

    table = io.shards_table(shards)
    per_block = -(-len(shards) // min(len(shards), 10_000))
    return ray.data.from_arrow([table.slice(i, per_block) for i in range(0, len(shards), per_block)])


def _shard_round(todo: list[Shard], stages: list[tuple], bar, t0: float, counted: dict) -> list[dict]:
    """One Ray Data pass over ``todo``; a shard whose task fails is skipped (left for the next round)."""
    import ray

    ctx = ray.data.DataContext.get_current()  # a Dataset copies the context it is created in
    old, ctx.max_errored_blocks = ctx.max_errored_blocks, -1
    out = []
    try:
        ds = shards_dataset(todo)
        for cls, kwargs, (lo, hi), remote_args in stages:
            ds = ds.map_batches(cls, batch_size=1, fn_constructor_kwargs=kwargs,
                                compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                                max_task_retries=0, **remote_args)
        for s in ds.iter_rows():
            out.append(dict(s))
            counted["rows"] += s["scored"] + s["rejected"]
            counted["tokens"] += s["tokens"]
            dt = max(time.time() - t0, 1e-9)
            bar.set_postfix_str(f"{counted['rows'] / dt:,.1f} rows/s {counted['tokens'] / dt:,.0f} tok/s")
            bar.update(1)
    finally:
        ctx.max_errored_blocks = old
    return out


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _fingerprint(settings: dict, shards: list[Shard]) -> str:
    return digest([settings, io.shards_digest(shards)])


def _plan_record(cfg: JobConfig, kind: str, shards: list[Shard], extra: dict) -> dict:
    """The plan's JSON: what the result depends on and its fingerprint (the shards go to OUT/_plan_shards.parquet)."""
    settings = {**cfg.result_fields(), **extra}
    return {"kind": kind, "fingerprint": _fingerprint(settings, shards), "settings": settings,
            "forvalue_ray": __version__}


def _file_stamp(url: str) -> list:
    """Input identity without reading data: paths, sizes and modification times."""
    out = []
    for full, _, _ in io.list_inputs(url):
        fs, p = io.filesystem(full)
        info = fs.info(p)
        out.append([full, info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")])
    return out


def _encode_kw(cfg: JobConfig) -> dict:
    return {"max_length": cfg.max_length, "overlong": cfg.overlong, "columns": cfg.columns(), "form": cfg.form,
            "image_column": cfg.images_column, "response_eos": cfg.response_eos}


def _load_kw(cfg: JobConfig) -> dict:
    return {"dtype": cfg.dtype, "adapter": cfg.adapter, "attn_implementation": cfg.attn_implementation,
            "trust_remote_code": cfg.trust_remote_code, "gpus": cfg.gpus_per_actor}


def _actor_args(cfg: JobConfig) -> dict:
    args = {"num_cpus": cfg.cpus_per_actor}
    if cfg.gpus_per_actor:
        args["num_gpus"] = cfg.gpus_per_actor
    return args


def _model_stages(cfg, model_path, scorer_kw, broadcast, kind):
    group_col = cfg.group_column if kind == "sketches" else None
    encode = (EncodeShards, {"tokenizer_path": model_path, "encode_kw": _encode_kw(cfg), "group_column": group_col,
                             "trust_remote_code": cfg.trust_remote_code}, (1, max(1, actor_range(cfg.num_actors)[1])),
              {"num_cpus": 0.5})
    score = (ScoreShards, {"model_path": model_path, "load_kw": _load_kw(cfg), "scorer_kw": scorer_kw,
                           "broadcast": broadcast, "out": cfg.out, "kind": kind, "mode": cfg.mode,
                           "group_column": group_col, "storage": cfg.storage},
             actor_range(cfg.num_actors), _actor_args(cfg))
    return [encode, score]


def write_run_json(cfg: JobConfig, kind: str, shards: list[Shard], summaries: list[dict], t0: float,
                   extra: dict, faults: dict | None = None) -> dict:
    """Counts over the whole output (a resumed run too), plus provenance: this invocation's shards from their
    summaries, the shards finished before it from their parts' footers (no footer read on a run that did not resume).
    """
    fs, base = io.filesystem(io.join(cfg.out, kind))
    counts = {"rows_read": 0, "scored": 0, "rejected": 0, "tokens": 0, "truncated_rows": 0, "truncated_tokens": 0}
    now = {s["shard"]: s for s in summaries}
    for s in shards:
        meta = now.get(s.key) or json.loads(pq.read_schema(f"{base}/{s.key}.parquet", filesystem=fs)
                                           .metadata[PART_META])
        for k in counts:
            counts[k] += meta.get(k, 0)
    run = {"command": cfg.command, "config": asdict(cfg), "counts": {**counts, "shards": len(shards)},
           "this_invocation": {"shards": len(summaries), "wall_seconds": round(time.time() - t0, 3),
                               "rows_per_second": round(sum(s["scored"] + s["rejected"] for s in summaries)
                                                        / max(time.time() - t0, 1e-9), 3),
                               **(faults or {"nodes_lost": [], "retried_shards": [], "shards_per_node": {}})},
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "forvalue_ray": __version__, **extra}
    io.write_json_atomic(io.join(cfg.out, "run.json"), run)
    return run


def _model_identity(cfg: JobConfig) -> tuple[str, dict, str]:
    """The loadable model path (GGUF converted once, here on the driver), its provenance and fingerprint."""
    from .model import adapter_provenance, model_fingerprint, resolve_model

    model_path, provenance = resolve_model(cfg.model, cfg.revision)
    provenance.update(adapter_provenance(cfg.adapter))
    provenance["dtype"] = cfg.dtype or ("bfloat16" if cfg.gpus_per_actor else "float32")  # as the actors load it
    return model_path, provenance, model_fingerprint(provenance)


def _targets_table(ids: list[str]) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.string())})


def run_value(cfg: JobConfig) -> dict:
    """``forvalue-ray value``: target pass (or a reused artifact), then one score per training row."""
    import ray

    from .artifacts import check_compatible, load_target_stats

    t0 = time.time()
    cfg.validate()
    model_path, provenance, fp = _model_identity(cfg)
    shards = io.plan_shards(cfg.train, cfg.format, cfg.shard_rows, cfg.shard_bytes)
    target_id = (_file_stamp(cfg.target) if cfg.target and not cfg.target_stats
                 else io.read_json(io.join(cfg.target_stats, "target_stats.json"))["provenance"])
    center_id = io.read_json(io.join(cfg.center_stats, "target_stats.json"))["provenance"] if cfg.center_stats else None
    record = _plan_record(cfg, "scores", shards, {"model_fingerprint": fp, "target": target_id,
                                                  "train_files": _file_stamp(cfg.train), "center": center_id})
    done = prepare_out(cfg, record, shards)
    info = {"model": provenance, "model_fingerprint": fp, "mode": cfg.mode}
    if done >= {s.key for s in shards} and io.exists(io.join(cfg.out, "run.json")):
        prev = io.read_json(io.join(cfg.out, "run.json"))  # finished: no target pass, no actors
        return write_run_json(cfg, "scores", shards, [], t0,
                              {**info, **{k: prev.get(k) for k in ("target_rows", "target_rejected", "center_rows")}})
    init_ray(cfg.ray_address)
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
        payload, target_ids, target_info = build_target(cfg, model_path, provenance, fp)
    if cfg.center or cfg.center_stats:
        center, center_info = build_center(cfg, model_path, provenance, fp, shards)
        payload = _remote_on_driver_node(_center_payload).remote(payload, center)
        target_info.update(center_info)
    io.write_table_atomic(io.join(cfg.out, "targets.parquet"), _targets_table(target_ids))
    broadcast = payload if isinstance(payload, ray.ObjectRef) else ray.put(payload)
    summaries, faults = run_shards(cfg, shards, done, _model_stages(cfg, model_path, scorer_kw, broadcast, "scores"))
    return write_run_json(cfg, "scores", shards, summaries, t0, {**info, **target_info}, faults)


# target rows per partial: fixed, so the reduce order never depends on the actors (tests set a smaller one
# through the environment, which their job subprocesses inherit)
TARGET_BLOCK_ROWS = int(os.environ.get("FORVALUE_TARGET_BLOCK_ROWS", "64"))


def build_target(cfg: JobConfig, model_path: str, provenance: dict, fp: str, artifact: str = "target"):
    """The target pass: encode the (small) target set on the driver; model actors compute one additive
    partial per fixed block of target rows (or keep its tokens, pairwise); blocks are reduced in float64 in
    block order by Ray tasks, so the result is bit-identical for any number of actors and the statistics
    ([K, V, d]) never pass through the driver process: the last task, on the driver's node, saves the artifact and
    holds the broadcast.
    Returns (payload ref, target ids, info); the artifact goes to OUT/<artifact>/."""
    import ray

    # the same reading, encoding and row routing as the training rows', on the driver
    encoder = EncodeShards(model_path, _encode_kw(cfg), cfg.group_column if cfg.mode == "groups" else None,
                           cfg.trust_remote_code)
    rows, groups, rejected, group_names = [], [], [], set()
    for shard in io.plan_shards(cfg.target, cfg.format, cfg.shard_rows, cfg.shard_bytes):
        enc = encoder.encode(shard)
        rows += enc["rows"]
        groups += ["mean" if g is None else g for g in enc["groups"]]
        rejected += enc["rejected"]
        group_names |= enc["group_names"]
    if rejected:
        io.write_table_atomic(io.join(cfg.out, artifact, "rejected.parquet"),
                              pa.table({"id": [r[0] for r in rejected], "reason": [r[1] for r in rejected]}))
    if not rows:
        raise ValueError(f"no valid target rows in {cfg.target} ({len(rejected)} rejected: see "
                         f"{io.join(cfg.out, artifact, 'rejected.parquet')})")
    names = sorted(set(groups))
    info = {"target_rows": len(rows), "target_rejected": len(rejected), **{
        f"target_{k}": v for k, v in encode_summary(rows).items()}}
    empty = sorted(group_names - set(names))
    if empty:
        info["target_groups_without_rows"] = empty
        print(f"warning: target group(s) {empty} have no valid row (all rejected: see "
              f"{io.join(cfg.out, artifact, 'rejected.parquet')}); they get no score column", file=sys.stderr)
    blocks = [list(range(i, min(i + TARGET_BLOCK_ROWS, len(rows)))) for i in range(0, len(rows), TARGET_BLOCK_ROWS)]
    add_partials = _remote(_add_partials)
    finish_target, join_references = map(_remote_on_driver_node, (_finish_target, _join_references))
    worker = ray.remote(**_actor_args(cfg))(TargetWorker)
    actors = [worker.remote(model_path, _load_kw(cfg), cfg.vocab_chunk, cfg.batch_tokens)
              for _ in range(min(actor_range(cfg.num_actors)[1], len(blocks)))]
    if cfg.mode == "pairwise":
        parts = [actors[b % len(actors)].reference.remote([rows[i] for i in block], block[0])
                 for b, block in enumerate(blocks)]
        payload = join_references.remote(*parts)
    else:
        from .engine import target_form

        index = [names.index(g) for g in groups]
        stats_form = "dense" if cfg.center or cfg.center_stats else target_form(  # centering subtracts dense statistics
            sum(r.n_valued for r in rows), len(names), *ray.get(actors[0].head_shape.remote()))
        info["target_stats_form"] = stats_form
        parts = [actors[b % len(actors)].partial.remote([rows[i] for i in block], [index[i] for i in block],
                                                       len(names), cfg.normalize, stats_form)
                 for b, block in enumerate(blocks)]
        total = parts[0]
        for part in parts[1:]:  # a chain, in block order: fixed summation order, two partials in memory
            total = add_partials.remote(total, part)
        payload = finish_target.remote(total, names, cfg.normalize, {**provenance, "model_fingerprint": fp},
                                        io.join(cfg.out, artifact))
    ray.wait([payload], fetch_local=False)
    for a in actors:  # free their model replicas before the value pass starts its own
        ray.kill(a)
    return payload, ([r.id for r in rows] if cfg.mode == "pairwise" else names), info


CENTER_MIN_SHARDS = 16


def sample_training_rows(shards: list[Shard], n: int, seed: int) -> tuple[list[tuple[str, dict]], list[str]]:
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


def build_center(cfg: JobConfig, model_path: str, provenance: dict, fp: str, shards: list[Shard]):
    """μ for --center: the target pass over a seeded random sample of the training rows (of --data, sketching),
    saved under OUT/center/
    with the sample itself (sample.parquet or .jsonl) and its provenance (sample.json); or the statistics of an
    earlier run's sample (--center-stats). Returns (payload, info)."""
    from .artifacts import check_compatible, load_target_stats

    if cfg.center_stats:
        stats = load_target_stats(cfg.center_stats)
        check_compatible("--center-stats", {"model_fingerprint": fp}, stats.provenance)
        return {"stats": stats}, {"center_rows": sum(stats.counts)}
    sample, read = sample_training_rows(shards, cfg.center, cfg.center_seed)
    rows = [row for _, row in sample]
    if any(s.fmt == "jsonl" for s in shards if s.key in read):
        path = io.join(cfg.out, "center", "sample.jsonl")
        fs, p = io.filesystem(path)
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(p, "w") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        path = io.join(cfg.out, "center", "sample.parquet")
        io.write_table_atomic(path, pa.Table.from_pylist(rows))
    enc = Encoder(None, columns=cfg.columns())
    io.write_json_atomic(io.join(cfg.out, "center", "sample.json"), {
        "requested_rows": cfg.center, "seed": cfg.center_seed, "rows": len(rows), "shards_read": read,
        "ids": [enc.row_id(row, fallback) for fallback, row in sample],
        "train_files": _file_stamp(cfg.train or cfg.data)})
    payload, _, info = build_target(replace(cfg, target=path, format="auto", mode="mean", group_column=None),
                                    model_path, provenance, fp, artifact="center")
    return payload, {"center_rows": info["target_rows"], "center_rejected": info["target_rejected"]}


def _center_payload(target: dict, center: dict) -> dict:
    from .api import center_target_stats

    return {"stats": center_target_stats(target["stats"], center["stats"])}


def _remote(fn):
    import ray

    return ray.remote(num_cpus=0.5, max_retries=3)(fn)  # pure functions of their inputs: safe to retry


def _remote_on_driver_node(fn):
    """For the tasks that make the value pass's broadcast: a task's result lives on the node that ran it, and the
    actors that computed its inputs are gone by then, so Ray could not rebuild it if that node were lost. On the
    driver's node it is lost only with the driver, which ends the job anyway. num_cpus=0: a KubeRay head usually
    offers no CPUs to tasks; these are light reductions."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_retries=3, scheduling_strategy=here)(fn)


def _add_partials(a, b):
    return a[0] + b[0], a[1] + b[1]


def _finish_target(total, names, normalize, provenance, out_dir):
    from .artifacts import save_target_stats
    from .engine import finish_target_stats

    stats = finish_target_stats(total[0], total[1], names, normalize, provenance)
    save_target_stats(stats, out_dir)
    return {"stats": stats}


def _join_references(*parts):
    from .engine import join_references

    return {"reference": join_references(parts)}


class TargetWorker:
    """A model replica for the target pass (a Ray actor)."""

    def __init__(self, model_path, load_kw, vocab_chunk, max_tokens):
        self.vm = _load(model_path, load_kw)
        self.kw = {"vocab_chunk": vocab_chunk, "max_tokens": max_tokens}

    def head_shape(self) -> tuple[int, int]:
        return tuple(self.vm.head.weight.shape)

    def partial(self, rows, group_index, n_groups, normalize, stats_form):
        from .engine import target_partial

        return target_partial(self.vm, rows, group_index, n_groups, normalize=normalize, stats_form=stats_form,
                              **self.kw)

    def reference(self, rows, first_row: int):
        from .engine import build_reference

        return build_reference(self.vm, rows, **self.kw).to("cpu"), first_row


def run_sketch(cfg: JobConfig) -> dict:
    """``forvalue-ray sketch``: per-row TensorSketches written as an index; with --center / --center-stats, centered
    on μ (each row keeps TS(G) − TS(μ) and ⟨G, μ⟩; index.json records μ's identity and ‖μ‖²)."""
    import ray

    t0 = time.time()
    cfg.validate()
    model_path, provenance, fp = _model_identity(cfg)
    shards = io.plan_shards(cfg.data, cfg.format, cfg.shard_rows, cfg.shard_bytes)
    index_meta = {"dim": cfg.dim, "seed": cfg.seed, "storage": cfg.storage, "model_fingerprint": fp, "model": provenance,
                  "group_column": cfg.group_column, "center_id": None, "forvalue_ray": __version__}
    center_stamp = _file_stamp(io.join(cfg.center_stats, "target_stats.json")) if cfg.center_stats else None
    record = _plan_record(cfg, "sketches", shards, {"model_fingerprint": fp, "data_files": _file_stamp(cfg.data),
                                                    "center": center_stamp})
    done = prepare_out(cfg, record, shards)
    init_ray(cfg.ray_address)
    scorer_kw = {"sketch_dim": cfg.dim, "sketch_seed": cfg.seed, "vocab_chunk": cfg.vocab_chunk,
                 "max_tokens": cfg.batch_tokens}
    broadcast, info = None, {}
    if cfg.center or cfg.center_stats:
        broadcast, info = build_center(cfg, model_path, provenance, fp, shards)
        broadcast = broadcast if isinstance(broadcast, ray.ObjectRef) else ray.put(broadcast)
        summary = ray.get(_remote_on_driver_node(_center_summary).remote(broadcast))  # μ itself stays off the driver
        index_meta.update(center_id=summary["id"], center={
            **summary, "artifact": cfg.center_stats or io.join(cfg.out, "center")})
        info.update(center_id=summary["id"])
    io.write_json_atomic(io.join(cfg.out, "index.json"), index_meta)
    summaries, faults = run_shards(cfg, shards, done, _model_stages(cfg, model_path, scorer_kw, broadcast, "sketches"))
    return write_run_json(cfg, "sketches", shards, summaries, t0, {"model": provenance, "model_fingerprint": fp,
                                                                   **info}, faults)


def _center_summary(payload: dict) -> dict:
    mu = payload["stats"].stats[0]
    return {"id": center_id(mu), "rows": payload["stats"].counts[0], "sq_norm": float(mu.double().pow(2).sum())}


def run_score(cfg: JobConfig) -> dict:
    """``forvalue-ray score``: target statistics from a target index, scores for every row of an index."""
    import ray

    from .artifacts import check_compatible

    t0 = time.time()
    cfg.validate()
    # indexes from before --storage hold float32; from before centering, raw sketches
    meta = {"storage": "float32", "center_id": None, **io.read_json(io.join(cfg.index, "index.json"))}
    tmeta = {"storage": "float32", "center_id": None, **io.read_json(io.join(cfg.target_index, "index.json"))}
    if meta["center_id"] != tmeta["center_id"]:
        raise ValueError(f"--target-index is centered on {tmeta['center_id']!r} and --index on {meta['center_id']!r} "
                         f"(None: not centered): estimates add up only on the same μ. Build the target index with "
                         f"`forvalue-ray sketch --center-stats "
                         f"{(meta.get('center') or {}).get('artifact', 'INDEX/center')}`"
                         if meta["center_id"] else "--target-index is centered but --index is not: build both the "
                         "same way (drop --center / --center-stats from the target index, or center the index)")
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
    values, scale, center_dot = stored_sketches(targets)
    columns = sketch_targets(values, scale, labels, ids, normalize=cfg.normalize, center_dot=center_dot,
                             center_sq_norm=(tmeta.get("center") or {}).get("sq_norm", 0.0))
    ids = target_ids if cfg.mode == "pairwise" else ids
    shards = io.plan_shards(io.join(cfg.index, "sketches"), "parquet", cfg.shard_rows, cfg.shard_bytes)
    record = _plan_record(cfg, "scores", shards, {"index": meta, "target_index": tmeta,
                                                  "target_files": _file_stamp(io.join(cfg.target_index, "sketches"))})
    done = prepare_out(cfg, record, shards)
    io.write_table_atomic(io.join(cfg.out, "targets.parquet"), _targets_table(ids))
    init_ray(cfg.ray_address)
    stage = (ScoreSketches, {"broadcast": ray.put(columns), "out": cfg.out, "mode": cfg.mode},
             actor_range(cfg.num_actors), {"num_cpus": 0.5})
    summaries, faults = run_shards(cfg, shards, done, [stage])
    return write_run_json(cfg, "scores", shards, summaries, t0, {"model": meta.get("model"),
                                                                "model_fingerprint": meta["model_fingerprint"]},
                          faults)
