"""The shown rows joined back to their input (through the shard-aligned layout), and their text as the run valued
it."""

from __future__ import annotations

import json
import posixpath
import re

import pyarrow.parquet as pq

from .. import io
from ..encode import Columns, Encoder
from ..job.parts import SELECTION, RunOutput
from .scan import _read_table

SNIPPET_CHARS = 280


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
