"""``select``: write the top (or bottom) rows by value in the data's own format, as distributed passes.

Scores are shard-aligned with the input (``scores/<shard>.parquet`` holds the rows of input shard ``<shard>``), so
each input shard is filtered by its own score part with no global join. The threshold is exact: per group,
histograms of the scores (counts, or token sums for ``budget_tokens``) over the shards are refined until the rows
around the cut fit in memory, which are then sorted (ties broken by id): the same set a full sort gives
(:func:`selected_ids` is that full sort, kept as the reference). ``combine="round-robin"`` searches the number of
complete rounds with the same cuts (one per target) and counting passes, then places the last, partial round
exactly. The driver holds the plan and per-group counts, never ids or scores.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import posixpath
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import io, promptfit
from ..encode import Columns, Encoder
from ..io import Shard, Shards
from . import executor, parts

CUT_BINS = 1024  # histogram bins per lane and refinement round
CUT_CANDIDATES = 1 << 16  # rows around a cut gathered on the driver to place it exactly
ROUND_PROBES = 3  # round-robin: numbers of rounds tried per counting pass (a (PROBES+1)-ary search)


# ---- per-shard steps (tasks, no Ray in them) ---------------------------------------------------------------------------------------------------------
#
# A *lane* is what one cut is found for: (group, column[, probe]) where column indexes the values a row is ranked by
# (one column, or one per target for --combine round-robin). Lanes travel as tuples to the tasks and come back as
# JSON lists.

COMBINES = ("max", "round-robin")
# what a row is ranked by: its value (score/scores), the cosine of its embedding to the targets' (embed: pairwise
# scores), or the sum of the two (both cosines: the similarity of the joined, unit-scaled features)
RANK_BY = ("value", "embed", "value+embed")


def score_matrix(scores: pa.Table, by: str = "value") -> np.ndarray:
    """[n, K] every target's score of each row (K = 1 for a mean-mode score), by ``by`` (:data:`RANK_BY`)."""
    if by != "value":
        embed = _matrix(scores, "embed")
        return embed if by == "embed" else score_matrix(scores) + embed
    if "score" in scores.column_names:
        return np.asarray(scores["score"].to_numpy(), dtype=np.float64).reshape(-1, 1)
    return _matrix(scores, "scores")


def _matrix(scores: pa.Table, column: str) -> np.ndarray:
    n = scores.num_rows
    if not n:
        return np.zeros((0, 1))
    return np.asarray(pc.list_flatten(scores[column]).to_numpy(), dtype=np.float64).reshape(n, -1)


def ranked_values(scores: pa.Table, target: int | None, combine: str | None = None, by: str = "value") -> np.ndarray:
    """The value each row is ranked by: its score (mean mode), one target's column, the max over targets
    (``combine="max"``) or the mean over targets. (Round-robin ranks by every column: :func:`lane_values`.)"""
    if "score" in scores.column_names:
        return np.asarray(scores["score"].to_numpy(), dtype=np.float64)
    mat = score_matrix(scores, by)
    if target is not None:
        return mat[:, target]
    return mat.max(1) if combine in COMBINES else mat.mean(1)


def lane_values(scores: pa.Table, target: int | None, combine: str | None, by: str = "value") -> np.ndarray:
    """[n, L]: the columns lanes rank by: every target's (round-robin), else the one ranked value."""
    if combine == "round-robin":
        return score_matrix(scores, by)
    return ranked_values(scores, target, combine, by).reshape(-1, 1)


def eligible(scores: pa.Table, min_prompt_fit: float | dict | None, keys: list | None = None) -> pa.Table:
    """The scored rows a selection ranks: all, or with ``min_prompt_fit`` those whose prompt_fit is at least it or
    null (a row with no partner prompt: no evidence against it). ``min_prompt_fit``: one number, or per key a
    threshold (a dict, e.g. :func:`~forvalue_ray.promptfit.null_thresholds`; 0 for a key it lacks) with ``keys``
    each row's key (:func:`_group_key` of its prompt-fit column)."""
    if min_prompt_fit is None:
        return scores
    fit = scores["prompt_fit"]
    if isinstance(min_prompt_fit, dict):
        min_prompt_fit = pa.array([min_prompt_fit.get(k, 0.0) for k in keys], pa.float64())
    return scores.filter(pc.or_kleene(pc.is_null(fit), pc.greater_equal(fit, min_prompt_fit)))


def shard_keys(shard: Shard, scores_dir: str, id_column: str, per_group: str | None, target: int | None,
               combine: str | None = None, min_prompt_fit: float | dict | None = None, by: str = "value",
               fit_key: str | None = None, n_lanes: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """The ranked rows of one shard (:func:`eligible`; per-key thresholds read each row's ``fit_key`` column from
    the data): ids, the [n, L] values ranked (L = ``n_lanes``), n_tokens, and (per group) each row's group."""
    scores, path = read_scores(shard, scores_dir)
    keys = _keys(shard, id_column, fit_key, scores["id"].to_pylist()) if isinstance(min_prompt_fit, dict) else None
    scores = eligible(scores, min_prompt_fit, keys)
    ids = np.asarray(scores["id"].to_pylist(), dtype=str) if scores.num_rows else np.zeros(0, dtype=str)
    if by != "value" and scores.num_rows and "embed" not in scores.column_names:
        raise ValueError(f"--by {by}: the scores part {path} has no embed column (pairwise scores of an earlier "
                         f"forvalue-ray have none); re-run that value command with --overwrite")
    # an empty part (or one --min-prompt-fit emptied) has no row to read the targets' width from
    values = lane_values(scores, target, combine, by) if scores.num_rows else np.zeros((0, n_lanes))
    tokens = (np.asarray(scores["n_tokens"].to_numpy(), dtype=np.int64) if "n_tokens" in scores.column_names
              else np.zeros(len(ids), np.int64))
    if not per_group:
        return ids, values, tokens, [None] * len(ids)
    return ids, values, tokens, _keys(shard, id_column, per_group, ids.tolist())


def read_scores(shard: Shard, scores_dir: str) -> tuple[pa.Table, str]:
    """The shard's scores part, and its path (for messages)."""
    fs, path = io.filesystem(parts.RunOutput(scores_dir).part("scores", shard.key))
    return pq.read_table(path, filesystem=fs), path


def _keys(shard: Shard, id_column: str, column: str, ids: list) -> list:
    """Each id's :func:`_group_key` of ``column`` in the shard's data (None where it has none)."""
    enc = Encoder(None, columns=Columns(id=id_column))
    key_of = {enc.row_id(row, fb): row.get(column) for fb, row in io.read_shard(shard)[0]}
    return [_group_key(key_of.get(i)) for i in ids]


def fit_null_moments(shard: Shard, scores_dir: str, id_column: str, fit_key: str) -> dict:
    """The shard's :func:`~forvalue_ray.promptfit.null_moments` per prompt-fit key, as [[key, count, sum of
    squares], ...]."""
    scores, _ = read_scores(shard, scores_dir)
    fit = np.asarray(scores["prompt_fit"].to_numpy(zero_copy_only=False), dtype=np.float64)
    moments = promptfit.null_moments(fit, _keys(shard, id_column, fit_key, scores["id"].to_pylist()))
    return {"moments": [[k, n, ss] for k, (n, ss) in moments.items()]}


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


# ---- the reference: a full sort -------------------------------------------------------------------------------------


def selected_ids(scores: pa.Table, *, top_fraction=None, top_k=None, bottom_fraction=None, budget_tokens=None,
                 groups: dict | None = None, target: int | None = None, combine: str | None = None,
                 min_prompt_fit: float | str | None = None, fit_keys: dict | None = None, by: str = "value"
                 ) -> dict[str, float]:
    """The reference selection by a full sort (in memory): ids → score of the chosen rows; per group when ``groups``
    maps id → group. Order: score descending, ties by id ascending; bottom is its tail. ``combine="max"`` ranks by
    the max over targets; ``combine="round-robin"`` orders rows by (their best rank over the targets' rankings, the
    first target reaching it) — the targets' rankings interleaved, each row where it first appears — and reports
    the max over targets as the score. ``budget_tokens``: the longest prefix of that order whose ``n_tokens`` sum is
    at most the budget (``scores`` needs an ``n_tokens`` column). ``min_prompt_fit``: only :func:`eligible` rows;
    ``"auto"``: per key, the :func:`~forvalue_ray.promptfit.auto_thresholds` of these rows, ``fit_keys`` mapping
    id → key. ``by``: what rows are ranked by (:data:`RANK_BY`)."""
    if min_prompt_fit == "auto":
        if fit_keys is None:
            raise ValueError("min_prompt_fit='auto' needs fit_keys: each id's prompt-fit key")
        keys = [_group_key(fit_keys.get(i)) for i in scores["id"].to_pylist()]
        fit = np.asarray(scores["prompt_fit"].to_numpy(zero_copy_only=False), dtype=np.float64)
        scores = eligible(scores, promptfit.auto_thresholds(fit, keys), keys)
    else:
        scores = eligible(scores, min_prompt_fit)
    if not scores.num_rows:  # nothing ranked (no row to read the targets' width from either)
        return {}
    ids = scores["id"].to_pylist()
    n = len(ids)
    id_rank = np.empty(n, np.int64)
    id_rank[np.argsort(np.asarray(ids, dtype=str), kind="stable")] = np.arange(n)
    if combine == "round-robin":
        mat = score_matrix(scores, by)
        shown = mat.max(1)
    else:
        shown = np.asarray(ranked_values(scores, target, combine, by), dtype=np.float64)
    tokens = np.asarray(scores["n_tokens"].to_numpy(), dtype=np.int64) if budget_tokens is not None else None
    codes: dict = {}
    label = np.fromiter((codes.setdefault(None if groups is None else groups.get(i), len(codes)) for i in ids),
                        dtype=np.int64, count=n)
    chosen = {}
    for code in range(len(codes)):
        members = np.nonzero(label == code)[0]
        m = len(members)
        if combine == "round-robin":
            sub = mat[members]
            rank = np.empty(sub.shape, np.int64)
            for t in range(sub.shape[1]):
                rank[np.lexsort((id_rank[members], -sub[:, t])), t] = np.arange(m)
            order = members[np.lexsort((rank.argmin(1), rank.min(1)))]
        else:
            order = members[np.lexsort((id_rank[members], -shown[members]))]
        if budget_tokens is not None:
            take = order[:int(np.searchsorted(np.cumsum(tokens[order]), budget_tokens, side="right"))]
        else:
            k = _wanted(m, top_fraction, top_k, bottom_fraction)
            take = order[m - k:] if bottom_fraction is not None else order[:k]
        chosen.update({ids[i]: float(shown[i]) for i in take})
    return chosen


def raw_score_warning(settings: dict) -> str | None:
    """Selecting the top of the paper's raw score (mean mode, no --normalize, no centering) favours long,
    high-error rows: fine-tuned on such a selection, SmolLM2 did worse than on a random one on SciQ
    (docs/selection.md). Said, not refused: the raw score stays right for finding harmful rows."""
    if settings.get("command") != "value" or settings.get("mode", "mean") != "mean" or settings.get("normalize") \
            or settings.get("center") or settings.get("center_stats"):
        return None
    return ("note: these are the paper's raw scores, which favour long, high-error rows; for fine-tuning data, "
            "value with --normalize (or --mode pairwise --normalize, then select --combine round-robin): measured "
            "in docs/selection.md")


def _wanted(n: int, top_fraction, top_k, bottom_fraction) -> int:
    if top_k is not None:
        return min(top_k, n)
    return int(round((top_fraction if top_fraction is not None else bottom_fraction) * n))


# ---- the distributed cut ----------------------------------------------------------------------------------------


def find_cuts(shards: Shards, wanted: dict, stats: dict, keys_kw: dict, tokens: bool = False,
              exact: bool = False) -> dict:
    """Per lane, the cut of its ranking (score desc, id asc) found by refining histograms over the shards (each
    round one distributed pass, CUT_BINS bins per lane) until at most CUT_CANDIDATES rows remain around it, which
    are sorted on the driver. Counts (``tokens`` false): the ``wanted``-th row, [score, id, True] (rows at or before
    it: the first ``wanted``). Tokens: the first row whose running ``n_tokens`` sum exceeds ``wanted``,
    [score, id, False] (the rows before it: the longest prefix within the budget). None: no row; "all": every row.
    ``stats``: lane → (rows, lowest, highest, tokens). ``exact``: the last row is placed too, not called "all"."""
    cuts: dict = {}
    state = {}  # lane → [lo, hi, measure above hi, rows within [lo, hi]]
    for lane, m in wanted.items():
        n, lo, hi, tok = stats[lane]
        if tokens:
            if tok <= m:
                cuts[lane] = "all"
                continue
        elif m <= 0 or m > n or (m == n and not exact):
            cuts[lane] = None if m <= 0 else "all"
            continue
        state[lane] = [lo, hi, 0, n]
    while any(s[3] > CUT_CANDIDATES and s[0] < s[1] for s in state.values()):
        refine = {lane: s for lane, s in state.items() if s[3] > CUT_CANDIDATES and s[0] < s[1]}
        edges = {}
        for lane, (lo, hi, _, _) in refine.items():
            inner = np.unique(np.linspace(lo, hi, CUT_BINS + 1)[1:])
            edges[lane] = [lo, hi, [float(lo)] + [float(e) for e in inner if lo < e <= hi]]
        ge = {lane: np.zeros(len(e[2]), dtype=np.int64) for lane, e in edges.items()}
        tok_ge = {lane: np.zeros(len(e[2]), dtype=np.int64) for lane, e in edges.items()}
        for res in executor.shard_pass(shards, counts_at_or_above, edges=edges, **keys_kw):
            for lane, counts, toks in res["counts"]:
                ge[tuple(lane)] += np.asarray(counts, dtype=np.int64)
                tok_ge[tuple(lane)] += np.asarray(toks, dtype=np.int64)
        for lane, (lo, hi, above, _) in refine.items():
            e = edges[lane][2]  # measure[j]: of the interval's rows with value >= e[j]; e[0] = lo
            measure = tok_ge[lane] if tokens else ge[lane]
            # the highest edge with the cut's row at or above it
            hit = above + measure > wanted[lane] if tokens else above + measure >= wanted[lane]
            j = int(np.nonzero(hit)[0].max())
            last = j == len(e) - 1
            new_hi = hi if last else float(np.nextafter(e[j + 1], -np.inf))
            new_above = above + (0 if last else int(measure[j + 1]))
            state[lane] = [e[j], new_hi, new_above, int(ge[lane][j]) - (0 if last else int(ge[lane][j + 1]))]
    rows: dict = {}
    if state:
        for res in executor.shard_pass(shards, candidates, intervals={lane: s[:2] for lane, s in state.items()},
                                       **keys_kw):
            for lane, v, i, t in res["rows"]:
                rows.setdefault(tuple(lane), []).append((-v, i, t))
    for lane, s in state.items():
        ordered = sorted(rows.get(lane, []))
        if tokens:
            running = s[2] + np.cumsum([t for _, _, t in ordered])
            neg_v, rid, _ = ordered[int(np.nonzero(running > wanted[lane])[0][0])]
            cuts[lane] = [-neg_v, rid, False]
        else:
            neg_v, rid, _ = ordered[wanted[lane] - s[2] - 1]
            cuts[lane] = [-neg_v, rid, True]
    return cuts


def round_robin_cuts(shards: Shards, want: dict, stats: dict, keys_kw: dict, tokens: bool) -> tuple[dict, dict]:
    """Round-robin over K targets, per group: rows in the order (best rank over the targets, first target reaching
    it), the first ``want`` (rows, or tokens). After R complete rounds the rows taken are the union of every target's
    top R: its size is counted by one pass over the targets' cuts at rank R, so R is searched (ROUND_PROBES values
    per pass); the next round's rows (each target's row at rank R, if not taken) are fetched by id and placed in
    target order. Returns the write's cuts (lanes (group, target, 0): the top R) and extras (group → ids)."""
    if not stats:  # no row is ranked (e.g. --min-prompt-fit left none): nothing to select
        return {}, {}
    lane_stats = {lane: s for lane, s in stats.items()}
    k_targets = 1 + max(c for _, c in stats)
    groups = sorted({g for g, _ in stats}, key=json.dumps)
    size = {g: (stats[(g, 0)][3] if tokens else stats[(g, 0)][0]) for g in groups}
    cuts: dict = {}
    extras: dict = {}
    lo, f_lo, hi = {}, {}, {}  # rounds known to fit (and their size), rounds known not to
    for g in groups:
        if size[g] <= want[g] or (not tokens and want[g] <= 0):
            cuts[(g, 0, 0)] = "all" if size[g] <= want[g] else None
        else:
            lo[g], f_lo[g], hi[g] = 0, 0, stats[(g, 0)][0]
    while any(hi[g] - lo[g] > 1 for g in lo):
        probes = {g: sorted({int(p) for p in np.linspace(lo[g], hi[g], ROUND_PROBES + 2)[1:-1].round()}
                            - {lo[g], hi[g]}) for g in lo if hi[g] - lo[g] > 1}
        wanted = {(g, t, p): p for g, ps in probes.items() for p in ps for t in range(k_targets)}
        probe_cuts = find_cuts(shards, wanted, {lane: lane_stats[lane[:2]] for lane in wanted}, keys_kw)
        sizes: dict = {}
        for res in executor.shard_pass(shards, union_counts, cuts=probe_cuts, **keys_kw):
            for g, p, n, tok in res["counts"]:
                sizes[(g, p)] = sizes.get((g, p), 0) + (tok if tokens else n)
        for g, ps in probes.items():
            for p in ps:
                if sizes.get((g, p), 0) <= want[g]:
                    if p > lo[g]:
                        lo[g], f_lo[g] = p, sizes.get((g, p), 0)
                elif p < hi[g]:
                    hi[g] = p
    if not lo:
        return cuts, extras
    # R = lo complete rounds; round R adds target t's row at rank R (the (R+1)-th), unless taken
    wanted = {(g, t, q): lo[g] + q for g in lo for t in range(k_targets) for q in (0, 1)}
    edge_cuts = find_cuts(shards, wanted, {lane: lane_stats[lane[:2]] for lane in wanted}, keys_kw, exact=True)
    next_rows = {g: [edge_cuts[(g, t, 1)][1] for t in range(k_targets)] for g in lo}
    found: dict = {}
    for res in executor.shard_pass(shards, rows_by_id, wanted={g: set(r) for g, r in next_rows.items()}, **keys_kw):
        for g, rid, values, tok in res["rows"]:
            found[(g, rid)] = (values, tok)
    for g in lo:
        top = {t: edge_cuts[(g, t, 0)] for t in range(k_targets)}
        cuts.update({(g, t, 0): cut for t, cut in top.items()})
        room, picked = want[g] - f_lo[g], []
        for rid in next_rows[g]:
            values, tok = found[(g, rid)]
            if rid in picked or any(is_before(values[t], rid, top[t]) for t in range(k_targets)):
                continue
            cost = tok if tokens else 1
            if cost > room:
                break
            picked.append(rid)
            room -= cost
        extras[g] = picked
    return cuts, extras


# ---- the command ----------------------------------------------------------------------------------------------------


def select(scores_dir: str, data: str | None, out: str, *, top_fraction=None, top_k=None, bottom_fraction=None,
           budget_tokens=None, per_group: str | None = None, target: str | None = None, combine: str | None = None,
           min_prompt_fit: float | str | None = None, by: str = "value", overwrite: bool = False) -> dict:
    """Write the chosen rows of the scored data in its own format (Parquet or JSONL; HF Arrow → Parquet).

    ``data`` defaults to the input the scores were computed from (it must be that input: scores are
    shard-aligned with it). ``budget_tokens``: the longest prefix of the ranking whose valued tokens sum to at most
    the budget. ``combine`` (several targets): ``max`` ranks by a row's best score; ``round-robin`` interleaves the
    targets' rankings. ``min_prompt_fit``: rank only rows whose prompt fit is at least this, or has none
    (:func:`eligible`; the scores need ``value --prompt-fit-column``); ``"auto"``: per value of that column, the
    root mean square of its negative prompt fits (:func:`~forvalue_ray.promptfit.null_thresholds`, one more
    pass). ``by``: rank by the value, the embedding cosine (``embed``, written by pairwise scores) or their sum
    (:data:`RANK_BY`). Exactly once and resumable like ``value``: re-running the same selection into the same
    ``out`` finishes it; a different one is refused unless ``overwrite`` (and only a selection is ever replaced).
    Returns the rows selected and written, the rows scored and the tokens selected."""
    if sum(x is not None for x in (top_fraction, top_k, bottom_fraction, budget_tokens)) != 1:
        raise ValueError("give exactly one of --top-fraction, --top-k, --bottom-fraction, --budget-tokens")
    for name, frac in (("--top-fraction", top_fraction), ("--bottom-fraction", bottom_fraction)):
        if frac is not None and not 0 < frac <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {frac}")
    for name, count in (("--top-k", top_k), ("--budget-tokens", budget_tokens)):
        if count is not None and count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    if combine is not None and combine not in COMBINES:
        raise ValueError(f"--combine must be one of {', '.join(COMBINES)}, not {combine!r}")
    if combine is not None and target is not None:
        raise ValueError("--combine and --target exclude each other: --target ranks by one target only")
    if isinstance(min_prompt_fit, str) and min_prompt_fit != "auto":
        raise ValueError(f"--min-prompt-fit takes a number or 'auto', not {min_prompt_fit!r}")
    if by not in RANK_BY:
        raise ValueError(f"--by must be one of {', '.join(RANK_BY)}, not {by!r}")
    if combine == "round-robin" and bottom_fraction is not None:
        raise ValueError("--combine round-robin takes the top of each target; it has no bottom (use --combine max)")
    if not parts.RunOutput(scores_dir).has_plan():
        raise FileNotFoundError(f"{scores_dir} has no {parts.PLAN_FILE}: not a value or score output")
    plan, shards = parts.RunOutput(scores_dir).load_plan()
    if plan["kind"] != "scores":
        raise ValueError(f"{scores_dir} holds {plan['kind']}, not scores: select reads a value or score output")
    missing = shards.without(parts.RunOutput(scores_dir).finished("scores"))
    if missing:
        raise ValueError(f"{scores_dir} is incomplete: {len(missing)} of {len(shards)} shards have no scores part "
                         f"(an unfinished or crashed run); `forvalue-ray verify {scores_dir}` tells which, and "
                         f"re-running the value (or score) command finishes them")
    settings = plan["settings"]
    if min_prompt_fit is not None and not settings.get("prompt_fit_column"):
        raise ValueError(f"--min-prompt-fit: {scores_dir} has no prompt_fit column; value with --prompt-fit-column "
                         f"COLUMN (the column whose equal values share a template, e.g. task) to compute it")
    if by != "value" and (settings.get("command") != "value" or settings.get("mode") != "pairwise"):
        raise ValueError(f"--by {by}: {scores_dir} has {settings.get('mode')}-mode scores; the embedding cosine is "
                         f"written with pairwise scores (`value --mode pairwise`)")
    scored = settings.get("train")
    if by == "value" and bottom_fraction is None and raw_score_warning(settings):
        print(raw_score_warning(settings), file=sys.stderr)
    if settings.get("index"):  # a `score` output: its parts are named after the index's parts, i.e. data shards
        index_plan, data_shards = parts.RunOutput(settings["index"]).load_plan()
        by_key = {s.key: s for s in data_shards}
        shards = Shards.of(dataclasses.replace(by_key[s.label.rsplit(".", 1)[0]], key=s.key) for s in shards)
        settings = index_plan["settings"]
        scored = settings["data"]
    if data is not None and [f[0] for f in io.list_inputs(data)] != [f[0] for f in io.list_inputs(scored)]:
        raise ValueError(f"--data {data} is not the data {scores_dir} scored ({scored}): scores are aligned with "
                         f"the scored input's shards; omit --data to use it")
    for name, url in (("scores", scores_dir), ("data", scored), ("index", plan["settings"].get("index"))):
        if url and _overlaps(out, url):
            raise ValueError(f"--out {out} is, lies inside or contains the {name} ({url}): select would write "
                             f"into (or replace) what it reads; choose another --out")
    if per_group is not None:
        found = _columns(shards)
        if found is not None and per_group not in found:
            raise ValueError(f"--per-group {per_group!r} is not a column of the data {scored}; its columns: "
                             f"{', '.join(found)}")
    target_index = None
    if target is not None:
        names = parts.RunOutput(scores_dir).load_targets()
        if target not in names:
            raise ValueError(f"--target {target!r} is not among the targets {names[:10]}")
        target_index = names.index(target)
    criteria = {"scores": plan["fingerprint"], "top_fraction": top_fraction, "top_k": top_k,
                "bottom_fraction": bottom_fraction, "per_group": per_group, "target": target}
    new = {"budget_tokens": budget_tokens, "combine": combine, "min_prompt_fit": min_prompt_fit,
           "by": None if by == "value" else by}
    # criteria added later count only when given: a selection written before them keeps its fingerprint
    record = {"kind": "selection", "fingerprint": parts.digest({**criteria, **{k: v for k, v in new.items() if v is not None}}),
              "settings": {**criteria, **new}}
    replace = _check_out(out, record, overwrite)
    executor.init_ray(None)
    keys_kw = {"scores_dir": scores_dir, "id_column": settings.get("id_column", "id"), "per_group": per_group,
               "target": target_index, "combine": combine, "min_prompt_fit": min_prompt_fit, "by": by,
               "n_lanes": len(parts.RunOutput(scores_dir).load_targets()) if combine == "round-robin" else 1}
    if min_prompt_fit == "auto":
        keys_kw["fit_key"] = plan["settings"]["prompt_fit_column"]
        # a resumed selection keeps the thresholds its written shards used
        earlier = parts.RunOutput(out).load_selection() if not replace and parts.RunOutput(out).has_selection() else {}
        found = earlier.get("settings", {}).get("prompt_fit_thresholds")
        if found is None:
            found = auto_fit_thresholds(shards, scores_dir, keys_kw["id_column"], keys_kw["fit_key"])
        keys_kw["min_prompt_fit"] = record["settings"]["prompt_fit_thresholds"] = found
        print(f"--min-prompt-fit auto: a threshold for each of {len(found)} {keys_kw['fit_key']!r} values with "
              f"negative prompt fits (median {np.median(list(found.values())) if found else 0:.3f} nats/token); "
              f"listed in {out}/_select.json", file=sys.stderr)
    stats: dict = {}  # lane (group, column) → rows, lowest, highest, tokens
    for res in executor.shard_pass(shards, group_stats, **keys_kw):
        for g, c, n, lo, hi, tok in res["lanes"]:
            n0, lo0, hi0, tok0 = stats.get((g, c), (0, np.inf, -np.inf, 0))
            stats[(g, c)] = (n0 + n, min(lo0, lo), max(hi0, hi), tok0 + tok)
    by_tokens = budget_tokens is not None
    want = {}
    for (g, c), (n, _, _, _) in stats.items():
        if c == 0:
            want[g] = budget_tokens if by_tokens else _wanted(n, top_fraction, top_k, bottom_fraction)
    extras = None
    if combine == "round-robin":
        cuts, extras = round_robin_cuts(shards, want, stats, keys_kw, by_tokens)
    else:
        wanted = {(g, 0): (m if bottom_fraction is None else stats[(g, 0)][0] - m) for g, m in want.items()}
        cuts = find_cuts(shards, wanted, stats, keys_kw, tokens=by_tokens)
    done = _open_out(out, record, replace)
    selected = written = tokens = 0
    todo = shards.without(done)
    finished = shards.only(done)  # by an earlier, interrupted run: their counts from footers
    for res in itertools.chain(
            executor.shard_pass(todo, write_selected, out=out, cuts=cuts, bottom=bottom_fraction is not None,
                                extras=extras, **keys_kw),
            executor.shard_pass(finished, selection_counts, out=out)):
        selected, written, tokens = selected + res["selected"], written + res["written"], tokens + res["tokens"]
    return {"selected": selected, "written": written, "scored": int(sum(s[0] for (_, c), s in stats.items() if c == 0)),
            "tokens": tokens}


def auto_fit_thresholds(shards: Shards, scores_dir: str, id_column: str, fit_key: str) -> dict:
    """``--min-prompt-fit auto``: per key, :func:`~forvalue_ray.promptfit.null_thresholds` of the negative prompt
    fits of every shard (one pass; the driver holds a count and a sum per key, never a row)."""
    moments: dict = {}
    for res in executor.shard_pass(shards, fit_null_moments, scores_dir=scores_dir, id_column=id_column,
                                   fit_key=fit_key):
        promptfit.merge_moments(moments, {k: (n, ss) for k, n, ss in res["moments"]})
    return promptfit.null_thresholds(moments)


def _check_out(out: str, record: dict, overwrite: bool) -> bool:
    """Before any work: may this selection go to ``out``? True when an earlier selection there is to be replaced.
    Only a folder holding a selection (its _select.json) is ever replaced, and only with ``overwrite``; any other
    non-empty folder is refused."""
    if parts.RunOutput(out).has_selection():
        if parts.RunOutput(out).load_selection().get("fingerprint") != record["fingerprint"] and not overwrite:
            raise FileExistsError(f"{out} holds a different selection; choose another --out or pass --overwrite")
        return overwrite
    if io.exists(out) and _listing(out):
        raise FileExistsError(f"{out} is not empty and holds no selection (no _select.json): select replaces only "
                              f"an earlier selection, even with --overwrite; choose another --out or empty it")
    return False


def _open_out(out: str, record: dict, replace: bool) -> set[str]:
    """Create, replace or resume the selection in ``out`` (once the cuts are known); its finished shards."""
    if replace:
        io.remove_tree(out)
    if not parts.RunOutput(out).has_selection():
        parts.RunOutput(out).save_selection(record)
    io.remove_temporaries(out)  # a writer killed mid-write; its shard is redone
    return parts.RunOutput(out).finished(parts.SELECTION)


def _listing(url: str) -> list[str]:
    fs, path = io.filesystem(url)
    return fs.ls(path, detail=False) if fs.exists(path) else []


def _location(url: str) -> tuple[str, str]:
    fs, path = io.filesystem(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        import os

        path = os.path.realpath(path)
    return protocol, posixpath.normpath(path.rstrip("/") or "/")


def _overlaps(a: str, b: str) -> bool:
    """The two locations are the same, or one lies inside the other."""
    (pa_, a), (pb, b) = _location(a), _location(b)
    return pa_ == pb and (a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/"))


def _columns(shards: Shards) -> list[str] | None:
    """The data's column names, from its first shard (Parquet/Arrow: the schema; JSONL: the keys of its rows)."""
    if not shards:
        return None
    shard = shards[0]
    fs, path = io.filesystem(shard.path)
    if shard.fmt == "parquet":
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).schema_arrow.names
    if shard.fmt == "arrow":
        with fs.open(path, "rb") as fh:
            return pa.ipc.open_stream(fh).schema.names
    names: dict = {}
    for _, row in io.read_shard(shard)[0]:
        names.update(dict.fromkeys(row))
    return list(names)
