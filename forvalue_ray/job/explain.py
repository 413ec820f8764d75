"""``forvalue-ray explain``: why a row scores what it does, token by token.

The chosen rows of a ``value`` output (by id, or the top / bottom K by score, per group of a data column) are
recomputed with the model, row form, mode and target statistics the run used — all read from the output: its
``run.json`` (the settings), ``OUT/target`` (the statistics; ``--target-stats`` when the run reused some),
``OUT/center`` (centering μ) and, pairwise, the target rows themselves (their reference is rebuilt). Each row's
score splits into one term per valued token (:func:`forvalue_ray.token_contributions`); ``DIR/tokens.parquet``
holds them with the token strings and their character offsets, ``DIR/index.html`` shows them.

Finding the rows is a pass over the score parts (Ray tasks over shards when there are many, each keeping its own
top K per group; the driver merges at most K per group per shard). A few rows are recomputed in-process on the
driver; more (up to 10⁴) go through the executor like ``value``: model actors each take the shards holding chosen
rows, read them, encode and explain the chosen rows only, and write one part per shard under ``DIR/_parts``.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import io
from ..explain_page import RECORD, offsets, render, token_pieces
from ..io import Shard
from . import executor, parts
from .config import ValueConfig, actor_range
from .selection import shard_keys
from .steps import load_replica, make_encoder

LOCAL_SHARDS = 64  # score parts scanned on the driver; more: Ray tasks
LOCAL_ROWS = 256  # rows explained in-process; more: model actors through the executor
MAX_ROWS = 10_000
PARTS = "_parts"

SCHEMA = pa.schema([("id", pa.string()), ("tokens", pa.list_(pa.string())), ("offsets", pa.list_(pa.int64())),
                    ("contributions", pa.list_(pa.float32())), ("valued", pa.list_(pa.bool_())),
                    ("score", pa.float64()), ("score_recomputed", pa.float64()), ("group", pa.string())])


def _run_config(scores: str) -> tuple[dict, ValueConfig]:
    if not parts.RunOutput(scores).has_run():
        raise FileNotFoundError(f"{scores} has no run.json: not a finished `forvalue-ray value` output")
    run = parts.RunOutput(scores).load_run()
    if run.get("command") != "value":
        raise ValueError(f"{scores} is the output of `{run.get('command')}`: explain recomputes exact scores of a "
                         f"`forvalue-ray value` output (sketched scores have no per-token form)")
    cfg = ValueConfig.from_dict({k: v for k, v in run["config"].items() if k != "extra"})
    if cfg.dtype in (None, "auto") and (run.get("model") or {}).get("dtype"):
        cfg.dtype = run["model"]["dtype"]  # the dtype the run chose, not what this machine would choose
    return run, cfg


def _column(names: list[str], target: str | None) -> int | None:
    if target is None:
        return 0 if len(names) == 1 else None
    if str(target) not in names:
        shown = ", ".join(map(repr, names[:10])) + (" …" if len(names) > 10 else "")
        raise ValueError(f"--target {target!r} is not a target of this output; its targets are {shown}")
    return names.index(str(target))


# ---- which rows ------------------------------------------------------------------------------------------------------


def pick_in_shard(shard: Shard, *, k: int, bottom: bool, ids: list[str] | None, **keys_kw) -> dict:
    """One shard's candidates [group, value, id, shard key]: the wanted ids, or its top/bottom k per group."""
    rids, lanes, _tokens, groups = shard_keys(shard, **keys_kw)
    values = lanes[:, 0]  # explain ranks by one value per row (the chosen target's, or the mean)
    if ids is not None:
        wanted = set(ids)
        return {"rows": [[g, float(v), i, shard.key] for i, v, g in zip(rids, values, groups) if i in wanted]}
    by_group: dict = {}
    for i, v, g in zip(rids, values, groups):
        by_group.setdefault(g, []).append((float(v), i))
    out = []
    for g, vals in by_group.items():
        vals.sort(key=lambda x: (x[0] if bottom else -x[0], x[1]))
        out += [[g, v, i, shard.key] for v, i in vals[:k]]
    return {"rows": out}


def choose_rows(scores: str, shards, cfg: ValueConfig, *, ids, top, bottom, per_group, column) -> list[list]:
    """[group, value, id, shard key] of the rows to explain, in the order shown: by value (lowest first for
    --bottom), per group; --ids in the order given."""
    k = top or bottom or 0
    kw = {"k": k, "bottom": bool(bottom), "ids": ids, "scores_dir": scores, "id_column": cfg.id_column,
          "per_group": per_group, "target": column}
    if len(shards) <= LOCAL_SHARDS:
        results = (pick_in_shard(s, **kw) for s in shards)
    else:
        executor.init_ray(cfg.ray_address)
        results = executor.shard_pass(shards, pick_in_shard, **kw)
    found = [r for res in results for r in res["rows"]]
    if ids is not None:
        first = {}
        for r in found:
            first.setdefault(r[2], r)
        missing = [i for i in ids if i not in first]
        if missing:
            raise ValueError(f"{len(missing)} of the --ids are not scored in {scores} (first: {missing[0]!r}); "
                             f"rejected rows have no score: see {parts.RunOutput(scores).parts_dir('rejected')}")
        return [first[i] for i in dict.fromkeys(ids)]
    found.sort(key=lambda r: (r[0] or "", r[1] if bottom else -r[1], r[2]))
    out, per = [], {}
    for r in found:
        per[r[0]] = per.get(r[0], 0) + 1
        if per[r[0]] <= k:
            out.append(r)
    return out


# ---- the target side, as the run had it ------------------------------------------------------------------------------


def target_side(scores: str, cfg: ValueConfig, fp: str):
    """Mean/groups: the run's target statistics (centered as it was); pairwise: None (the reference is rebuilt)."""
    from ..center import center_target_stats
    from ..artifacts import check_compatible, load_target_stats

    if cfg.mode == "pairwise":
        return None
    stats = load_target_stats(cfg.target_stats or parts.RunOutput(scores).artifact("target"))
    check_compatible("the run's target statistics", {"model_fingerprint": fp}, stats.provenance)
    if cfg.center or cfg.center_stats:
        center = load_target_stats(cfg.center_stats or parts.RunOutput(scores).artifact("center"))
        check_compatible("the run's centering statistics", {"model_fingerprint": fp}, center.provenance)
        stats = center_target_stats(stats, center)
    return stats


def pairwise_target_rows(cfg: ValueConfig, model_path: str, names: list[str], column: int | None) -> list:
    """The encoded target rows of a pairwise run (as its target pass encoded them): the chosen one, or all."""
    from .steps import EncodeShards

    encoder = EncodeShards(model_path, cfg.encode_kw(), None, cfg.trust_remote_code)
    rows = []
    for shard in io.plan_shards(cfg.target, cfg.format, cfg.shard_rows, cfg.shard_bytes):
        rows += encoder.encode(shard)["rows"]
    if [r.id for r in rows] != names:
        raise ValueError(f"the target rows in {cfg.target} are not those the run scored against (OUT/targets.parquet):"
                         f" the target data changed since the run")
    return rows if column is None else [rows[column]]


# ---- explaining the rows of one shard (no Ray) ----------------------------------------------------------------------


class ExplainShards:
    """A model replica explaining chosen rows shard by shard (in-process, or a model actor of the executor).
    ``side``: {"stats": TargetStats} or {"reference": Reference}; ``wanted``: shard key → {id: [value, group]};
    ``column``: the score column explained (None: the mean over columns)."""

    def __init__(self, model_path: str, load_kw: dict, encode_kw: dict, trust_remote_code: bool, side: dict,
                 normalize: bool, wanted: dict, column: int | None, out: str | None = None, vocab_chunk: int = 8192,
                 max_tokens: int = 4096, vm=None):
        from ..engine import Scorer

        self.vm = vm or load_replica(model_path, load_kw)
        self.encoder = make_encoder(model_path, encode_kw, trust_remote_code)
        self.scorer = Scorer(self.vm, **side, normalize=normalize, vocab_chunk=vocab_chunk, max_tokens=max_tokens)
        self.key = "pairwise" if "reference" in side else "scores"
        self.wanted, self.column, self.out = wanted, column, out

    def __call__(self, batch):  # the executor's actor: one part per shard
        out = []
        for shard in io.shards_from_columns(batch):
            t0 = time.time()
            table = self.table(shard)
            parts.write_part(self.out, PARTS, shard.key, table, {"shard": shard.key, "explained": table.num_rows})
            out.append({"shard": shard.key, "scored": table.num_rows, "seconds": time.time() - t0})
        return {k: [o[k] for o in out] for k in out[0]}

    def table(self, shard: Shard) -> pa.Table:
        wanted = self.wanted[shard.key]
        rows, seen = [], set()
        for fallback, row in io.read_shard(shard)[0]:
            rid = self.encoder.row_id(row, fallback)
            if rid in wanted and rid not in seen:
                seen.add(rid)
                rows.append(self.encoder(row, fallback))
        if not rows:
            return SCHEMA.empty_table()
        res = self.scorer.token_terms(rows)
        terms, scores = res["token_" + self.key], res[self.key]
        if self.column is None:
            terms, scores = [t.mean(1) for t in terms], scores.mean(1)
        else:
            terms, scores = [t[:, self.column] for t in terms], scores[:, self.column]
        tok = self.encoder.tokenizer
        pieces = [token_pieces(tok, r.input_ids) for r in rows]
        return pa.table({
            "id": [r.id for r in rows], "tokens": pieces, "offsets": [offsets(p) for p in pieces],
            "contributions": pa.array([t.astype(np.float32) for t in terms], pa.list_(pa.float32())),
            "valued": [(np.r_[False, r.labels[1:] != -100]).tolist() for r in rows],
            "score": [float(wanted[r.id][0]) for r in rows], "score_recomputed": [float(s) for s in scores],
            "group": [wanted[r.id][1] for r in rows]}, schema=SCHEMA)


# ---- the command ----------------------------------------------------------------------------------------------------


def explain(scores: str, out: str, *, ids: list[str] | None = None, top: int | None = None,
            bottom: int | None = None, target: str | None = None, per_group: str | None = None,
            local_rows: int = LOCAL_ROWS) -> dict:
    """Write DIR/tokens.parquet and DIR/index.html for the chosen rows of the value output ``scores``."""
    from .spec import model_identity

    t0 = time.time()
    if sum(x is not None for x in (ids, top, bottom)) != 1:
        raise ValueError("give exactly one of --ids, --top K, --bottom K")
    k = top or bottom
    if k is not None and not 1 <= k <= MAX_ROWS:
        raise ValueError(f"--top/--bottom K must be in [1, {MAX_ROWS}]")
    run, cfg = _run_config(scores)
    plan, shards = parts.RunOutput(scores).load_plan()
    names = parts.RunOutput(scores).load_targets()
    column = _column(names, target)
    model_path, provenance, fp = model_identity(cfg)
    if fp != run.get("model_fingerprint"):
        raise ValueError(f"the model {cfg.model!r} now resolves to fingerprint {fp}, the run used "
                         f"{run.get('model_fingerprint')}: explain needs the model the run scored with")
    chosen = choose_rows(scores, shards, cfg, ids=ids, top=top, bottom=bottom, per_group=per_group, column=column)
    if not chosen:
        raise ValueError(f"{scores} holds no scored row to explain")
    if len(chosen) > MAX_ROWS:
        raise ValueError(f"{len(chosen)} rows chosen; explain takes at most {MAX_ROWS}")
    wanted: dict = {}
    for g, v, rid, key in chosen:
        wanted.setdefault(key, {})[rid] = [v, None if g is None else str(json.loads(g))]
    stats = target_side(scores, cfg, fp)
    todo = shards.only(set(wanted))
    kw = dict(encode_kw=cfg.encode_kw(), trust_remote_code=cfg.trust_remote_code, normalize=cfg.normalize,
              wanted=wanted, vocab_chunk=cfg.vocab_chunk, max_tokens=cfg.batch_tokens)
    side_column = column if cfg.mode != "pairwise" or column is None else 0
    in_process = len(chosen) <= local_rows
    if in_process:
        vm = load_replica(model_path, cfg.load_kw())
        if stats is None:
            from ..engine import build_reference

            side = {"reference": build_reference(vm, pairwise_target_rows(cfg, model_path, names, column),
                                                 vocab_chunk=cfg.vocab_chunk, max_tokens=cfg.batch_tokens)}
        else:
            side = {"stats": stats}
        worker = ExplainShards(model_path, None, side=side, column=side_column, vm=vm, **kw)
        tables = [worker.table(s) for s in todo]
    else:
        executor.init_ray(cfg.ray_address)
        if stats is None:
            from .steps import TargetWorker

            pool = executor.ActorPool(TargetWorker, (model_path, cfg.load_kw(), cfg.vocab_chunk, cfg.batch_tokens),
                                      cfg.actor_resources(), 1)
            ref = pool.submit(0, "reference", pairwise_target_rows(cfg, model_path, names, column), 0)
            side = executor.broadcast(executor.on_driver_node(_reference_side, ref))
            pool.close(wait_for=side)
        else:
            side = executor.broadcast({"stats": stats})
        stage = executor.Stage(ExplainShards, {"model_path": model_path, "load_kw": cfg.load_kw(), "side": side,
                                               "column": side_column, "out": out, **kw},
                               actor_range(cfg.num_actors), cfg.actor_resources())
        done = io.list_parts(io.join(out, PARTS))
        executor.run_shards("explain", todo, done & set(todo.keys()), [stage], cfg.progress)
        tables = [pq.read_table(io.join(out, PARTS, s.key + ".parquet")) for s in todo]
    table = _in_order(pa.concat_tables([t.replace_schema_metadata(None).cast(SCHEMA) for t in tables]), chosen)
    if per_group is None:
        table = table.drop_columns(["group"])
    if cfg.mode == "pairwise":
        column_name = "mean over the target rows" if column is None else f"target row {names[column]}"
    else:
        column_name = ("mean over the target groups" if column is None else
                       "the mean target" if cfg.mode == "mean" else f"group {names[column]}")
    selection = (f"ids {', '.join(ids[:5])}{' …' if len(ids) > 5 else ''}" if ids is not None else
                 f"{'bottom' if bottom else 'top'} {k}" + (f" per {per_group}" if per_group else ""))
    meta = {"scores": scores, "selection": selection, "column": column_name, "mode": cfg.mode,
            "normalize": cfg.normalize, "centered": bool(cfg.center or cfg.center_stats),
            "variant": _variant(cfg), "form": cfg.form, "model_fingerprint": fp, "rows": table.num_rows,
            "seconds": round(time.time() - t0, 3), "in_process": in_process}
    io.write_table_atomic(io.join(out, "tokens.parquet"), table)
    fs, base = io.filesystem(out)
    with fs.open(f"{base}/index.html", "w") as fh:
        fh.write(render(table, meta))
    io.write_json_atomic(io.join(out, "explain.json"), meta)
    _record(scores, out)
    return {"rows": table.num_rows, "out": out, "page": io.join(out, "index.html"), "in_process": in_process}


def _reference_side(ref):
    return {"reference": ref[0]}


def _in_order(table: pa.Table, chosen: list) -> pa.Table:
    order = {rid: i for i, (_, _, rid, _) in enumerate(chosen)}
    idx = sorted(range(table.num_rows), key=lambda i: order.get(table["id"][i].as_py(), len(order)))
    return table.take(idx)


def _variant(cfg: ValueConfig) -> str:
    what = "cosine For-Value" if cfg.normalize else "For-Value inner product"
    if cfg.center or cfg.center_stats:
        what += ", centered"
    return f"{cfg.mode} mode, {what}"


def _record(scores: str, out: str) -> None:
    """Note DIR in OUT/explained.json so the report can link it (best effort: OUT may be read-only)."""
    if "://" not in out:
        out = os.path.abspath(out)
    if out.rstrip("/") == parts.RunOutput(scores if "://" in scores else os.path.abspath(scores)).explain_dir():
        return  # found without a record
    path = io.join(scores, RECORD)
    try:
        dirs = io.read_json(path).get("dirs", []) if io.exists(path) else []
        if out not in dirs:
            io.write_json_atomic(path, {"dirs": dirs + [out]})
    except OSError:
        pass
