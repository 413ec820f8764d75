"""The report's HTML page: one self-contained file, figures embedded, with the worst token spans of the rows
`forvalue-ray explain` explained and links to its pages."""

from __future__ import annotations

import base64
import html
import json

import numpy as np

from ..explain_page import SPAN
from .rows import snippet
from .scan import MAX_TARGET_ROWS

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
