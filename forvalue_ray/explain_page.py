"""Token strings, worst spans and the HTML page of ``forvalue-ray explain`` (reading and rendering only: no model,
no Ray). The job (:mod:`forvalue_ray.job.explain`) writes ``DIR/tokens.parquet``; :func:`render` turns it into
``DIR/index.html`` and :func:`worst_span` is what the report's bottom-rows table shows."""

from __future__ import annotations

import html
import json

import numpy as np

from . import io
from .job.parts import RunOutput

RECORD = "explained.json"  # OUT/explained.json: where explanations of this output were written (for the report)
SPAN = 3  # tokens in the worst span
NEGATIVE, POSITIVE = (202, 0, 32), (5, 113, 176)  # the ends of a diverging red–white–blue palette (ColorBrewer RdBu)


def token_pieces(tokenizer, ids) -> list[str]:
    """Each token's text, so that ``"".join(pieces)`` is the row's decoded text: token i's piece is what decoding
    it adds to the text of the tokens before it (a short window of them, so a tokenizer that drops a word's leading
    space at the start of a decode keeps it). A token that ends inside a multi-byte character gets "" and the
    character goes to the token that completes it."""
    ids = [int(i) for i in ids]
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    pieces, prefix, read = [], 0, 0  # decoded so far: ids[:read]; window start: prefix
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], **kw) if read > prefix else ""
        text = tokenizer.decode(ids[prefix:i + 1], **kw)
        if len(text) > len(before) and not text.endswith("\ufffd") and text.startswith(before):
            pieces.append(text[len(before):])
            prefix, read = read, i + 1
        elif i == len(ids) - 1 or i + 1 - prefix > 8:  # give up waiting: emit what is there
            pieces.append(text[len(before):] if text.startswith(before) else text)
            prefix = read = i + 1
        else:
            pieces.append("")
    return pieces


def offsets(pieces: list[str]) -> list[int]:
    """Each piece's character offset in ``"".join(pieces)``."""
    return np.concatenate([[0], np.cumsum([len(p) for p in pieces])[:-1]]).astype(np.int64).tolist() if pieces else []


def worst_span(contributions, valued, width: int = SPAN) -> tuple[int, int, float] | None:
    """The ``width`` consecutive valued tokens whose contributions sum lowest: (first position, last position,
    sum); all of them when the row has fewer; None when none is valued."""
    pos = np.flatnonzero(np.asarray(valued, dtype=bool))
    if not len(pos):
        return None
    c = np.asarray(contributions, dtype=np.float64)[pos]
    w = min(width, len(pos))
    sums = np.convolve(c, np.ones(w), mode="valid")
    k = int(np.argmin(sums))
    return int(pos[k]), int(pos[k + w - 1]), float(sums[k])


def span_text(pieces: list[str], span) -> str:
    return "" if span is None else "".join(pieces[span[0]:span[1] + 1])


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _num(x: float) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.4g}"


def colour(c: float, scale: float) -> str:
    """Background of a token: white at 0, towards red (negative) or blue (positive) with |c| / scale."""
    a = 0.0 if scale <= 0 else min(1.0, abs(c) / scale)
    end = NEGATIVE if c < 0 else POSITIVE
    r, g, b = (round(255 + (e - 255) * a) for e in end)
    return f"#{r:02x}{g:02x}{b:02x}"


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1d2430}
h1{font-size:22px;margin:0 0 4px} .sub{color:#5b6673;margin:0 0 14px} .note{color:#5b6673}
.legend{display:flex;align-items:center;gap:8px;margin:10px 0 18px;font-size:13px}
.bar{width:260px;height:14px;border:1px solid #ccd;background:linear-gradient(90deg,#ca0020,#ffffff,#0571b0)}
.row{border:1px solid #e1e5ea;border-radius:6px;padding:10px 12px;margin:12px 0}
.meta{font-size:13px;color:#37414d;margin-bottom:6px} .meta b{color:#1d2430}
.text{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;white-space:pre-wrap;word-break:break-word}
.text span{border-radius:2px} .text .p{color:#a0a7b0} .text .w{outline:2px solid #1d2430}
.span{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;background:#fbe3e4;padding:0 3px;border-radius:3px}
"""


def render(table, meta: dict) -> str:
    """The page: every explained row's text, valued tokens coloured by their contribution (scaled per row by its
    largest |c|), the prompt (tokens not valued) greyed, the worst span outlined; rows with the most negative worst
    span first. Every text is HTML-escaped."""
    rows = table.to_pylist()
    for r in rows:
        r["span"] = worst_span(r["contributions"], r["valued"])
    rows.sort(key=lambda r: (np.inf if r["span"] is None else r["span"][2], r["id"]))
    target = meta.get("column") or "score"
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>",
           f"<title>forvalue-ray explain — {_esc(meta.get('scores'))}</title><style>{STYLE}</style></head><body>",
           "<h1>Why these rows score what they do</h1>",
           f"<p class='sub'>{_esc(meta.get('scores'))} · {_esc(meta.get('selection'))} · against {_esc(target)} · "
           f"{_esc(meta.get('variant'))}</p>",
           "<p class='note'>A row's score is the sum of one term per valued token (response tokens, assistant turns, "
           "every predicted token of plain text). Each valued token is coloured by its term, scaled by the row's "
           "largest |term|; grey text is context that is not valued (the prompt). The outlined tokens are the row's "
           f"worst {SPAN}-token span. Hover a token for its term. Rows with the most negative span come first.</p>",
           "<div class='legend'><span>negative (lowers the score)</span><span class='bar'></span>"
           "<span>positive (raises it)</span></div>"]
    for i, r in enumerate(rows, 1):
        c = np.asarray(r["contributions"], dtype=np.float64)
        valued = np.asarray(r["valued"], dtype=bool)
        scale = float(np.abs(c[valued]).max()) if valued.any() else 0.0
        span = r["span"]
        cells = []
        for j, (piece, cj, v) in enumerate(zip(r["tokens"], c, valued)):
            if not piece:
                continue
            if not v:
                cells.append(f"<span class='p'>{_esc(piece)}</span>")
                continue
            worst = " w" if span is not None and span[0] <= j <= span[1] else ""
            cells.append(f"<span class='t{worst}' style='background:{colour(cj, scale)}' "
                         f"title='{_num(cj)}'>{_esc(piece)}</span>")
        group = f" · group <b>{_esc(r['group'])}</b>" if r.get("group") is not None else ""
        worst_txt = ("—" if span is None else
                     f"<span class='span'>{_esc(span_text(r['tokens'], span))}</span> ({_num(span[2])})")
        out.append(f"<div class='row' id='row-{i}'><div class='meta'>#{i} · id <b class='rid'>{_esc(r['id'])}</b> · "
                   f"score <b>{_num(r['score'])}</b>{group} · worst span {worst_txt} · colour scale "
                   f"±{_num(scale)}</div>"
                   f"<div class='text'>{''.join(cells)}</div></div>")
    out.append(f"<p class='note'>Settings: <code>{_esc(json.dumps(meta, default=str))}</code></p></body></html>")
    return "\n".join(out)


def explained_dirs(scores: str) -> list[str]:
    """Explanations of an output: OUT/explain when it holds one, and those recorded in OUT/explained.json."""
    dirs = []
    if io.exists(io.join(RunOutput(scores).explain_dir(), "tokens.parquet")):
        dirs.append(RunOutput(scores).explain_dir())
    path = io.join(scores, RECORD)
    if io.exists(path):
        dirs += [d for d in io.read_json(path).get("dirs", []) if io.exists(io.join(d, "tokens.parquet"))]
    return list(dict.fromkeys(dirs))


def worst_spans(dirs: list[str], ids) -> dict[str, tuple[str, float]]:
    """id → (text, sum) of the worst span of each of ``ids`` explained in ``dirs`` (the first explanation found)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted, out = set(ids), {}
    for d in dirs:
        fs, path = io.filesystem(io.join(d, "tokens.parquet"))
        with fs.open(path, "rb") as fh:
            t = pq.read_table(fh, columns=["id", "tokens", "contributions", "valued"])
        t = t.filter(pc.is_in(t["id"], value_set=pa_strings(wanted - set(out))))
        for r in t.to_pylist():
            span = worst_span(r["contributions"], r["valued"])
            if span is not None and r["id"] not in out:
                out[r["id"]] = (span_text(r["tokens"], span), span[2])
    return out


def pa_strings(values):
    import pyarrow as pa

    return pa.array(sorted(values), pa.string())
