"""``forvalue-ray report OUT``: a run at a glance — one self-contained HTML page, ``OUT/report/index.html``,
with its figures embedded (base64 PNG, so it opens from S3 or a laptop with no server) and saved beside it.

Works on the output of ``value`` (mean, groups, pairwise), ``score`` and ``select``, local or ``s3://``.
Pure reading and rendering, no Ray and no model. Bounded memory at any corpus size: the score parts are
read one at a time, keeping only the top and bottom N rows and a uniform sample (bottom-k of seeded random
keys) for the plots; per-target summaries are exact running sums. The text of the shown rows is joined from
the input through the shard-aligned layout — ``scores/<shard>.parquet`` holds the rows of the input shard
``<shard>`` of ``_plan.json`` (for ``score``: of the sketch index's plan) — reading only those rows' shards.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import posixpath
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import io
from .encode import Columns, Encoder
from .explain_page import SPAN, explained_dirs, worst_spans
from .job.parts import PART_META, SELECTION, RunOutput

DEFAULT_TOP = 15
DEFAULT_SAMPLE = 5000
SNIPPET_CHARS = 280
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


# ---- joining the shown rows back to their input ----------------------------------------------------------------


def index_dir(plan: dict, shards: list) -> str | None:
    """A ``score`` output's sketch index: the folder whose ``sketches/`` parts its plan's shards read."""
    if not plan["settings"].get("index") or not shards:
        return None
    return posixpath.dirname(posixpath.dirname(shards[0].path))


def input_shards(plan: dict, shards: list) -> tuple[dict, dict]:
    """score-part key → the input Shard it came from, and the settings that name the input's columns.
    ``value``: the plan's own shards; ``score``: through the sketch index's plan (a score part is named after
    the index part it read, an index part after its input shard)."""
    index = index_dir(plan, shards)
    if index is None:
        return {s.key: s for s in shards}, plan["settings"]
    index_plan, index_shards = RunOutput(index).load_plan()
    by_key = {s.key: s for s in index_shards}
    joined = {s.key: by_key.get(s.label.rsplit(".", 1)[0]) for s in shards}
    return {k: v for k, v in joined.items() if v is not None}, index_plan["settings"]


def join_rows(chosen: list[dict], shards: dict, settings: dict) -> tuple[dict, list[str]]:
    """id → input row for the chosen rows, reading each needed shard once; plus problems met."""
    enc = Encoder(None, columns=Columns(id=settings.get("id_column", "id")))
    wanted: dict[str, set] = {}
    for r in chosen:
        if r["shard"] in shards:
            wanted.setdefault(r["shard"], set()).add(r["id"])
    found, problems = {}, []
    for key, ids in wanted.items():
        try:
            rows, _ = io.read_shard(shards[key])
        except (OSError, ValueError) as e:
            problems.append(f"input shard {key} ({shards[key].path}) could not be read: {e}")
            continue
        for fallback, row in rows:
            rid = enc.row_id(row, fallback)
            if rid in ids and rid not in found:
                found[rid] = row
    return found, problems


def join_selection(out: str, chosen: list[dict]) -> tuple[dict, list[str]]:
    """A select output holds the chosen rows themselves, one file per input shard (``<name>-<shard>.parquet`` or
    ``.jsonl``, rows in input order). Rows are matched on their ``id`` column, or, without one, by position:
    derived ids (``<file>:<row>``, ``<file>@<byte>``) sort in input order."""
    wanted: dict[str, set] = {}
    for r in chosen:
        wanted.setdefault(r["shard"], set()).add(r["id"])
    fs, base = io.filesystem(out)
    by_key = {}  # shard key → file name: "<input name>-<shard key>.<ext>", the key being "<index>-<hash>"
    for name in (posixpath.basename(f) for f in fs.ls(base, detail=False)):
        if name.endswith((".parquet", ".jsonl")) and not name.startswith(("_", ".")):
            by_key["-".join(name.rsplit(".", 1)[0].rsplit("-", 2)[-2:])] = name
    found, problems = {}, []
    for key, ids in wanted.items():
        if key not in by_key:
            problems.append(f"no selected-rows file for shard {key} in {out}")
            continue
        fmt = io.detect_format(by_key[key])
        end = _end(fs, f"{base}/{by_key[key]}", fmt)
        rows = [row for _, row in io.read_shard(io.Shard("", io.join(out, by_key[key]), fmt, 0, end, -1, ""))[0]]
        if rows and all("id" in row for row in rows):
            found.update({row["id"]: row for row in rows if row["id"] in ids})
            continue
        part_ids = _read_table(io.join(out, SELECTION, key + ".parquet"))["id"].to_pylist()
        in_order = sorted(part_ids, key=lambda i: int(re.split(r"[:@]", i)[-1]))
        found.update({rid: row for rid, row in zip(in_order, rows) if rid in ids})
    return found, problems


def _end(fs, path: str, fmt: str) -> int:
    """The stop of a shard spanning a whole file: its row groups (Parquet) or its size (JSONL)."""
    if fmt == "parquet":
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_row_groups
    return fs.size(path)


FORMS = ("input_ids", "messages", "prompt_response", "text")  # the order in which form "auto" picks


def cut(text) -> str:
    text = str(text)
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


def snippet(row: dict | None, settings: dict) -> tuple[str, str]:
    """(input, response) text of a row, in the form the run valued (``form``; auto: the first present)."""
    if row is None:
        return "", ""
    col = {k: settings.get(f"{k}_column", k) for k in ("text", "prompt", "response", "messages", "input_ids")}
    has = {k: row.get(c) is not None for k, c in col.items()}
    present = {"input_ids": has["input_ids"], "messages": has["messages"], "text": has["text"],
               "prompt_response": has["prompt"] and has["response"]}
    form = settings.get("form", "auto")
    if form == "auto":
        form = next((f for f in FORMS if present[f]), None)
    if form == "prompt_response":
        return cut(row.get(col["prompt"], "")), cut(row.get(col["response"], ""))
    if form == "messages" and isinstance(row.get(col["messages"]), list) and row[col["messages"]]:
        turns = [m for m in row[col["messages"]] if isinstance(m, dict)]
        last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=len(turns) - 1)
        before = " | ".join(f"{m.get('role')}: {m.get('content')}" for m in turns[:last])
        return cut(before), cut(turns[last].get("content", "") if turns else "")
    if form == "text" and present["text"]:
        return cut(row[col["text"]]), ""
    if form == "input_ids" and present["input_ids"]:
        return f"{len(row[col['input_ids']])} token ids", ""
    return cut(json.dumps({k: v for k, v in row.items() if isinstance(v, (str, int, float))})), ""


# ---- figures -------------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ (ranks without tie averaging; the sample is continuous-valued)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a[ok])), np.argsort(np.argsort(b[ok]))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def figures(scan: Scan, mode: str, names: list, value_label: str) -> dict[str, tuple[str, bytes]]:
    """name → (caption, PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    s = scan.sample.cols
    if s:
        if mode == "groups" and len(names) > 1:
            fig, ax = plt.subplots(figsize=(7.5, 3.6))
            mat = s["scores"]
            bins = np.histogram_bin_edges(mat, bins=40)
            for k in range(min(len(names), MAX_GROUP_CURVES)):
                ax.hist(mat[:, k], bins=bins, histtype="step", lw=1.5, label=str(names[k]))
            ax.legend(fontsize=7, title="target group", title_fontsize=7)
            ax.set_xlabel("score against the group")
            caption = "Score distribution per target group"
        elif mode == "pairwise":
            fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
            ax.hist(s["value"], bins=40)
            ax.set_xlabel("mean score over the targets")
            summary = scan.summary.table()[:MAX_TARGET_ROWS]
            ax2.errorbar(np.arange(len(summary)), [t["mean"] for t in summary], yerr=[t["std"] for t in summary],
                         fmt="o", ms=3, capsize=2)
            ax2.set_xlabel("target (order of targets.parquet)")
            ax2.set_ylabel("score: mean ± std over rows")
            caption = "Score distribution (mean over targets) and per-target summary"
        else:
            fig, ax = plt.subplots(figsize=(7.5, 3.6))
            ax.hist(s["value"], bins=40)
            ax.set_xlabel(value_label)
            caption = "Score distribution"
        ax.set_ylabel(f"rows (sample of {len(s['value']):,})")
        fig.tight_layout()
        figs["distribution"] = (caption, _png(fig))
    if s and np.isfinite(s["nll"]).any():
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, key, label in ((axes[0], "nll", "mean NLL of the valued tokens"),
                               (axes[1], "n_tokens", "valued tokens")):
            ax.scatter(s[key], s["value"], s=6, alpha=0.4, lw=0)
            ax.set_xlabel(label)
            ax.set_ylabel(value_label)
            ax.set_title(f"Spearman ρ = {rank_correlation(s[key], s['value']):.2f}", fontsize=9)
        if np.all(s["n_tokens"] > 0):
            axes[1].set_xscale("log")
        fig.tight_layout()
        figs["value_vs_difficulty"] = ("Score against NLL and against length: is the value just 'easy' or 'short'?",
                                       _png(fig))
    if scan.rejected:
        cats = sorted(scan.rejected.items(), key=lambda kv: -kv[1][0])
        fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(cats) + 1.2))
        ax.barh([c[:60] for c, _ in cats][::-1], [v[0] for _, v in cats][::-1])
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("rejected rows")
        fig.tight_layout()
        figs["rejected"] = ("Rejected rows by reason", _png(fig))
    return figs


# ---- the page --------------------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
  color:#1d232a;padding:0 16px}
h1{font-size:22px;margin-bottom:2px}
h2{font-size:17px;margin-top:30px;border-bottom:1px solid #dde2e8;padding-bottom:4px}
.sub{color:#5b6673;margin-top:0} .variant{background:#eef4fb;border-left:4px solid #3b7dd8;padding:8px 12px}
table{border-collapse:collapse;width:100%;font-size:12.5px}
td,th{border:1px solid #dde2e8;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f5f7fa} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text{white-space:pre-wrap;word-break:break-word;max-width:420px} .kv td:first-child{width:230px;color:#5b6673}
figure{margin:12px 0} figcaption{color:#5b6673;font-size:12.5px} img{max-width:100%}
.note{color:#8a5a00} .span{font-family:ui-monospace,Menlo,monospace;background:#fbe3e4;padding:0 3px;border-radius:3px}
"""


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _num(x) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _kv_table(items) -> str:
    return "<table class='kv'>" + "".join(f"<tr><td>{_esc(k)}</td><td>{v}</td></tr>" for k, v in items) + "</table>"


def _rows_table(table_id: str, rows: list[dict], joined: dict, settings: dict, names: list, mode: str,
                spans: dict | None = None) -> str:
    """``spans``: id → (text, sum) of the worst token span of the rows `forvalue-ray explain` explained."""
    show_scores = mode != "mean" and 1 < len(names) <= 6
    texts = [snippet(joined.get(r["id"]), settings) for r in rows]
    with_response = any(response for _, response in texts)
    with_spans = bool(spans) and any(r["id"] in spans for r in rows)
    head = ["#", "id", "score" if mode == "mean" else "mean score"]
    head += [f"vs {n}" for n in names] if show_scores else []
    head += ["valued tokens", "NLL", "input"] + (["response"] if with_response else [])
    head += [f"worst {SPAN}-token span (explain)"] if with_spans else []
    out = [f"<table id='{table_id}'><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for i, (r, (text, response)) in enumerate(zip(rows, texts), 1):
        cells = [f"<td class='num'>{i}</td>", f"<td>{_esc(r['id'])}</td>",
                 f"<td class='num'>{_num(r['value'])}</td>"]
        cells += [f"<td class='num'>{_num(v)}</td>" for v in r["scores"]] if show_scores else []
        cells += [f"<td class='num'>{_num(None if np.isnan(r['n_tokens']) else int(r['n_tokens']))}</td>",
                  f"<td class='num'>{_num(r['nll'])}</td>", f"<td class='text'>{_esc(text)}</td>"]
        cells += [f"<td class='text'>{_esc(response)}</td>"] if with_response else []
        if with_spans:
            span = spans.get(r["id"])
            cells.append("<td>—</td>" if span is None else
                         f"<td class='text'><span class='span'>{_esc(span[0])}</span> ({_num(span[1])})</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</tbody></table>"


def variant_text(command: str, config: dict, index_meta: dict | None) -> str:
    """Which score this is: mode, inner product or cosine, exact or sketched, centered or not, valued tokens."""
    if command == "select":
        return ("a selection: rows chosen by their score (the score's variant is in the report of the value or "
                "score output it came from)")
    mode = config.get("mode", "mean")
    what = {"mean": "mean mode: each row against the mean gradient of all target rows",
            "groups": f"groups mode: each row against the mean gradient of each target group "
                      f"(column '{config.get('group_column')}')",
            "pairwise": "pairwise mode: each row against every target row"}.get(mode, f"{mode} mode")
    parts = [what, "cosine For-Value (--normalize)" if config.get("normalize")
             else "For-Value inner product ⟨G, Ḡ⟩"]
    if command == "score":
        dim = (index_meta or {}).get("dim", config.get("dim"))
        seed = (index_meta or {}).get("seed", config.get("seed"))
        parts.append(f"estimated from TensorSketches (dim {dim}, seed {seed})")
    else:
        parts.append("exact")
    if config.get("center_stats"):
        parts.append(f"centered: the mean gradient of an earlier sample ({config['center_stats']}) subtracted from "
                     f"the target statistics")
    elif config.get("center"):
        parts.append(f"centered: the mean gradient of a seeded random sample of {config['center']} training rows "
                     f"(seed {config.get('center_seed', 0)}) subtracted from the target statistics")
    else:
        parts.append("not centered")
    parts.append(f"valued tokens: form '{config.get('form', 'auto')}'")
    return "; ".join(parts)


def write_report(out: str, *, top: int = DEFAULT_TOP, sample: int = DEFAULT_SAMPLE, seed: int = 0) -> str:
    """Write ``OUT/report/index.html`` (+ one PNG per figure); returns the page's path."""
    plan, plan_shards = RunOutput(out).load_plan() if RunOutput(out).has_plan() else (None, [])
    is_selection = plan is None and io.exists(io.join(out, "_select.json"))
    if plan is None and not is_selection:
        raise FileNotFoundError(f"{out} is not a forvalue-ray output: no _plan.json (value, score) and no "
                                f"_select.json (select)")
    if plan is not None and plan.get("kind") != "scores":
        raise ValueError(f"{out} is a sketch index (kind '{plan.get('kind')}'): it holds no scores; report on the "
                         f"output of `forvalue-ray score` against it")
    run = _maybe_json(io.join(out, "run.json")) or {}
    config = run.get("config") or _resolved_config(out) or (plan or {}).get("settings", {})
    command = "select" if is_selection else run.get("command", "score" if config.get("index") else "value")
    mode = "mean" if is_selection else config.get("mode", "mean")
    problems: list[str] = []
    if is_selection:
        names = ["score"]
        scan = scan_selection(out, top, sample, seed)
        settings = {}
        joined, problems = join_selection(out, scan.top.rows() + scan.bottom.rows())
    else:
        names = _read_table(io.join(out, "targets.parquet"))["id"].to_pylist() if io.exists(
            io.join(out, "targets.parquet")) else ["score"]
        scan = scan_scores(out, plan_shards, names, top, sample, seed)
        if scan.n_parts < len(plan_shards):
            problems.append(f"unfinished: {scan.n_parts} of {len(plan_shards)} shards have a score part "
                            f"(re-run the same command to finish)")
        try:
            shards, settings = input_shards(plan, plan_shards)
            joined, join_problems = join_rows(scan.top.rows() + scan.bottom.rows(), shards, settings)
            problems += join_problems
        except (OSError, ValueError, KeyError) as e:
            shards, settings, joined = {}, plan["settings"], {}
            problems.append(f"the input could not be read for the row texts: {e}")
        target_rejected = io.join(out, "target", "rejected.parquet")
        if io.exists(target_rejected):
            _add_rejected(scan.rejected, _read_table(target_rejected), prefix="target row: ")
    explained, spans = [], {}
    if not is_selection:
        try:
            explained = explained_dirs(out)
            spans = worst_spans(explained, [r["id"] for r in scan.bottom.rows()])
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"the token explanations could not be read: {e}")
    index = None if plan is None else index_dir(plan, plan_shards)
    index_meta = _maybe_json(RunOutput(index).index_json) if index else None
    value_label = "score" if mode == "mean" else "mean score over targets"
    figs = figures(scan, mode, names, value_label)
    report_dir = io.join(out, "report")
    page = render(out, command, config, run, plan, scan, names, mode, figs, joined, settings, problems, index_meta,
                  [(d, _link(report_dir, io.join(d, "index.html"))) for d in explained], spans)
    fs, base = io.filesystem(report_dir)
    fs.makedirs(base, exist_ok=True)
    for name, (_, png) in figs.items():
        with fs.open(f"{base}/{name}.png", "wb") as fh:
            fh.write(png)
    with fs.open(f"{base}/index.html", "w") as fh:
        fh.write(page)
    return io.join(report_dir, "index.html")


def _link(report_dir: str, target: str) -> str:
    """A link from the report page to ``target``: relative when both are on the same local disk."""
    if "://" in report_dir or "://" in target:
        return target
    return posixpath.relpath(target, report_dir)


def render(out, command, config, run, plan, scan, names, mode, figs, joined, settings, problems, index_meta,
           explained=(), spans=None) -> str:
    counts = run.get("counts", {})
    inv = run.get("this_invocation", {})
    wall = inv.get("wall_seconds")
    complete_run = inv.get("shards") == counts.get("shards") and wall
    overview = [("command", _esc(command))] + ([("rows selected", _num(scan.n_rows))] if command == "select" else [])
    for key, label in (("rows_read", "rows read"), ("scored", "rows scored"), ("rejected", "rows rejected"),
                       ("tokens", "valued tokens"), ("shards", "shards"), ("truncated_rows", "rows truncated")):
        if key in counts:
            overview.append((label, _num(counts[key])))
    if wall:
        overview.append(("wall time (this invocation)", f"{wall:,.1f} s"))
        overview.append(("rows/s (this invocation)", _num(inv.get("rows_per_second"))))
        overview.append(("valued tokens/s", _num(counts.get("tokens", 0) / wall) if complete_run else
                         f"— (resumed: {inv.get('shards')} of {counts.get('shards')} shards this invocation)"))
    for key, label in (("target_rows", "target rows"), ("target_rejected", "target rows rejected"),
                       ("center_rows", "centering sample rows")):
        if run.get(key) is not None:
            overview.append((label, _num(run[key])))
    if command != "select":
        overview.append(("targets (score columns)", _esc(", ".join(map(str, names[:20]))
                                                         + (f" … ({len(names)} in all)" if len(names) > 20 else ""))))
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<link rel='icon' href='data:,'>",
             f"<title>forvalue-ray report — {_esc(out)}</title><style>{STYLE}</style></head><body>",
             "<h1>forvalue-ray report</h1>", f"<p class='sub'>{_esc(out)}</p>",
             f"<p class='variant' id='variant'><b>Score:</b> {_esc(variant_text(command, config, index_meta))}</p>"]
    parts += [f"<p class='note'>{_esc(p)}</p>" for p in problems]
    parts += ["<h2>Overview</h2>", _kv_table(overview)]
    if explained:
        links = ", ".join(f"<a href='{_esc(href)}'>{_esc(d)}</a>" for d, href in explained)
        parts.append(f"<p id='explained'><b>Token explanations</b> (<code>forvalue-ray explain</code>: each valued "
                     f"token's term of the score): {links}</p>")
    summary = scan.summary.table()
    if summary:
        parts.append("<h2>Scores</h2>")
        shown = summary[:MAX_TARGET_ROWS]
        parts.append("<table id='score-summary'><thead><tr><th>against</th><th>mean</th><th>std</th><th>min</th>"
                     "<th>max</th></tr></thead><tbody>" + "".join(
                         f"<tr><td>{_esc(t['target'])}</td>" + "".join(
                             f"<td class='num'>{_num(t[k])}</td>" for k in ("mean", "std", "min", "max")) + "</tr>"
                         for t in shown) + "</tbody></table>")
        if len(summary) > len(shown):
            parts.append(f"<p>… and {len(summary) - len(shown)} more targets.</p>")
    for name, (caption, png) in figs.items():
        if name == "rejected":
            continue
        parts.append(f"<figure id='fig-{name}'><img alt='{_esc(caption)}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}'><figcaption>{_esc(caption)}</figcaption></figure>")
    ranking = "score" if mode == "mean" else "mean score over the targets"
    for table_id, title, ranked in (("top-rows", "Most valuable", scan.top), ("bottom-rows", "Least valuable",
                                                                              scan.bottom)):
        rows = ranked.rows()
        parts.append(f"<h2>{title} {len(rows)} rows (by {ranking})</h2>")
        parts.append(_rows_table(table_id, rows, joined, settings, names, mode,
                                 spans if table_id == "bottom-rows" else None))
    parts.append("<h2>Rejected rows</h2>")
    if scan.rejected:
        parts.append("<table id='rejected-reasons'><thead><tr><th>reason</th><th>rows</th><th>examples (id: reason)"
                     "</th></tr></thead><tbody>")
        for cat, (n, examples) in sorted(scan.rejected.items(), key=lambda kv: -kv[1][0]):
            ex = "<br>".join(f"{_esc(i)}: {_esc(r)}" for i, r in examples)
            parts.append(f"<tr><td>{_esc(cat)}</td><td class='num'>{_num(n)}</td><td>{ex}</td></tr>")
        parts.append("</tbody></table>")
        caption, png = figs["rejected"]
        parts.append(f"<figure id='fig-rejected'><img alt='{_esc(caption)}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}'><figcaption>{_esc(caption)}</figcaption></figure>")
    else:
        parts.append("<p>None.</p>")
    parts.append("<h2>Provenance</h2>")
    prov = [("finished", _esc(run.get("finished"))), ("forvalue-ray version", _esc(run.get("forvalue_ray"))),
            ("model fingerprint", _esc(run.get("model_fingerprint")))]
    prov += [(f"model: {k}", _esc(v)) for k, v in sorted((run.get("model") or {}).items())]
    if plan:
        prov.append(("settings fingerprint", _esc(plan.get("fingerprint"))))
    parts.append(_kv_table(prov))
    parts.append("<h2>Settings</h2>")
    parts.append(_kv_table([(k, _esc(json.dumps(v, default=str) if isinstance(v, (dict, list)) else v))
                            for k, v in config.items()]))
    parts.append("</body></html>")
    return "\n".join(parts)
