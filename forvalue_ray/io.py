"""Inputs as shards, outputs written once: the storage side of the job, independent of Ray and the math.

A *shard* is a contiguous piece of one input file (Parquet row groups, a JSONL byte range, or rows of a
Hugging Face ``save_to_disk`` Arrow file). Shards are planned once per run and recorded in the output
directory; each shard's results land in one Parquet part written atomically, so the state needed to
resume is the list of finished parts: O(shards), never O(rows). Without an id column a row's id is
``<file>:<row>`` (Parquet/Arrow) or ``<file>@<byte offset>`` (JSONL): stable across runs and machines.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

DEFAULT_SHARD_ROWS = 4096
DEFAULT_SHARD_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class Shard:
    key: str  # stable name of the shard, used for its output part
    path: str  # full URL of the file
    fmt: str  # parquet | jsonl | arrow
    start: int  # first row group (parquet), byte offset (jsonl) or row (arrow)
    stop: int
    rows: int  # number of rows, -1 when unknown before reading (jsonl)
    label: str  # the file's name relative to the input root: the prefix of derived ids

    def to_dict(self) -> dict:
        return asdict(self)


SHARD_FIELDS = ("key", "path", "fmt", "start", "stop", "rows", "label")
SHARED_FIELDS = ("path", "fmt", "label")  # a few distinct values serve many shards: dictionary-encoded
SHARD_SCHEMA = pa.schema([(f, pa.int64() if f in ("start", "stop", "rows") else
                           pa.dictionary(pa.int32(), pa.string()) if f in SHARED_FIELDS else pa.string())
                          for f in SHARD_FIELDS])


class Shards:
    """A plan's shards as one Arrow table: ~50 B per shard on the driver, where a list of :class:`Shard` objects
    costs ~300 (10⁶ shards: ~50 MB against ~300 MB). Shard objects are built only when asked for, a batch at a time.
    """

    __slots__ = ("table",)

    def __init__(self, table: pa.Table):
        self.table = table

    @classmethod
    def of(cls, shards) -> "Shards":
        """From Shard objects (or a Shards)."""
        if isinstance(shards, Shards):
            return shards
        shards = list(shards)
        return cls(pa.table({f: pa.array([getattr(s, f) for s in shards], SHARD_SCHEMA.field(f).type)
                             for f in SHARD_FIELDS}, schema=SHARD_SCHEMA))

    def __len__(self) -> int:
        return self.table.num_rows

    def __iter__(self):
        for batch in self.table.to_batches(max_chunksize=1 << 16):
            yield from shards_from_columns(batch)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("Shards slices take no step")
            return Shards(self.table.slice(start, max(stop - start, 0)))
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return shards_from_columns(self.table.slice(i % len(self), 1))[0]

    def __add__(self, other) -> "Shards":
        return Shards(pa.concat_tables([self.table, Shards.of(other).table]))

    def __eq__(self, other) -> bool:
        return isinstance(other, (Shards, list, tuple)) and list(self) == list(other)

    def keys(self) -> list[str]:
        return self.table["key"].to_pylist()

    def only(self, keys) -> "Shards":
        """The shards whose key is in ``keys``, in plan order."""
        return Shards(self.table.filter(pc.is_in(self.table["key"], value_set=pa.array(list(keys), pa.string()))))

    def without(self, keys) -> "Shards":
        """The shards whose key is not in ``keys``, in plan order."""
        return Shards(self.table.filter(pc.invert(pc.is_in(self.table["key"],
                                                           value_set=pa.array(list(keys), pa.string())))))


def shards_from_columns(columns) -> list[Shard]:
    """Shards from a table, a record batch or a Ray Data batch (a dict of arrays or lists) with the SHARD_FIELDS
    columns. A dictionary column's strings are shared by its rows, not copied per row."""
    if isinstance(columns, (pa.Table, pa.RecordBatch)):
        columns = {f: _shared_strings(columns[f]) if f in SHARED_FIELDS else columns[f].to_pylist()
                   for f in SHARD_FIELDS}
    n = len(columns["key"])
    return [Shard(str(columns["key"][i]), str(columns["path"][i]), str(columns["fmt"][i]), int(columns["start"][i]),
                  int(columns["stop"][i]), int(columns["rows"][i]), str(columns["label"][i])) for i in range(n)]


def _shared_strings(column) -> list[str]:
    if isinstance(column, pa.ChunkedArray):
        return [v for chunk in column.chunks for v in _shared_strings(chunk)]
    if not pa.types.is_dictionary(column.type):
        return column.to_pylist()
    values = column.dictionary.to_pylist()
    return [values[i] for i in column.indices.to_numpy(zero_copy_only=False)]


def filesystem(url: str):
    # no listings cache: actors add parts while the driver reads, and a cached listing hides them
    fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False)
    return fs, path


def _full(fs, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def detect_format(path: str) -> str:
    name = path.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    if name.endswith(".jsonl") or name.endswith(".json") or name.endswith(".ndjson"):
        return "jsonl"
    if name.endswith(".arrow"):
        return "arrow"
    raise ValueError(f"unknown input format for {path}: expected .parquet, .jsonl/.json or a Hugging Face "
                     f"save_to_disk directory (set --format to force one)")


def list_inputs(url: str, fmt: str = "auto", exclude: str | None = None) -> list[tuple[str, str, str]]:
    """(full path, format, label) for every data file under a path, directory, glob or HF dataset dir;
    ``exclude``: a folder whose files are never inputs (the job's own output, when it lies inside the input)."""
    fs, path = filesystem(url)
    if any(c in path for c in "*?["):
        root = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0]
        files = sorted(f for f in fs.glob(path) if not _hidden(f, root) and fs.isfile(f))
    elif fs.isdir(path):
        root = path
        if fs.exists(posixpath.join(path, "dataset_dict.json")):
            splits = sorted(posixpath.basename(d) for d in fs.ls(path, detail=False) if fs.isdir(d))
            raise ValueError(f"{url} is a Hugging Face DatasetDict: point at one split folder ({', '.join(splits)})")
        files = sorted(f for f in fs.find(path) if not _hidden(f, root))
        if any(posixpath.basename(f) == "state.json" for f in files):  # HF save_to_disk: data is in .arrow
            files = [f for f in files if f.endswith(".arrow")]
        else:
            files = [f for f in files if fmt != "auto" or _known(f)]
    elif fs.exists(path):
        files, root = [path], posixpath.dirname(path)
    else:
        raise FileNotFoundError(f"no input at {url}")
    ex = filesystem(exclude)[1].rstrip("/") if exclude else None
    if ex and not (path.rstrip("/") == ex or path.startswith(ex + "/")):  # an input named inside OUT stays one
        files = [f for f in files if f != ex and not f.startswith(ex + "/")]
    if not files:
        raise FileNotFoundError(f"no data files at {url}")
    out = []
    for f in files:
        f_fmt = detect_format(f) if fmt == "auto" else fmt
        if f_fmt == "jsonl" and f.lower().endswith(".json") and _is_json_array(fs, f):
            f_fmt = "json"  # a .json file holding one JSON array of objects, not JSON lines
        out.append((_full(fs, f), f_fmt, posixpath.relpath(f, root) if root else f))
    return out


def file_stamp(url: str, exclude: str | None = None) -> list:
    """Input identity without reading data: paths, sizes and modification times (``exclude``: the job's own
    output folder, never one of its inputs)."""
    out = []
    for full, _, _ in list_inputs(url, exclude=exclude):
        fs, p = filesystem(full)
        info = fs.info(p)
        out.append([full, info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")])
    return out


def _is_json_array(fs, path: str) -> bool:
    """Whether a file's first non-blank character opens a JSON array."""
    with fs.open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == b"["


def _json_array(fs, path: str) -> list:
    with fs.open(path, "rb") as fh:
        data = json.load(fh)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json input must hold JSON lines or one JSON array of objects")
    return data


def _hidden(f: str, root: str) -> bool:
    """Names starting with _ or . anywhere below the root (_SUCCESS, .tmp-* parts, hidden folders) are not data."""
    return any(part.startswith(("_", ".")) for part in posixpath.relpath(f, root).split("/"))


def _known(f: str) -> bool:
    try:
        detect_format(f)
        return True
    except ValueError:
        return False


PLAN_THREADS = 32  # files whose metadata is read at once: object stores answer each footer read in ~30 ms


def plan_shards(url: str, fmt: str = "auto", shard_rows: int = DEFAULT_SHARD_ROWS,
                shard_bytes: int = DEFAULT_SHARD_BYTES, threads: int = PLAN_THREADS, exclude: str | None = None) -> Shards:
    """Split every input file into shards, reading only metadata (JSONL: byte ranges), ``threads`` files at a
    time: over an object store planning is bound by per-file latency, not bandwidth. Each file's shards become
    columns as soon as its metadata is read, so no Python object per shard outlives its file."""
    files = list_inputs(url, fmt, exclude)
    tables, count = [], 0
    for (full, f, label), (start, stop, rows) in zip(files, _spans_in_order(files, threads, shard_rows, shard_bytes)):
        n = len(start)
        # the key: position + a hash of where the shard starts
        keys = [f"{count + i:06d}-{hashlib.sha1(f'{label}:{a}'.encode()).hexdigest()[:8]}"
                for i, a in enumerate(start.tolist())]
        count += n
        columns = {"key": pa.array(keys, pa.string()), "start": pa.array(start), "stop": pa.array(stop),
                   "rows": pa.array(rows)}
        for name, value in (("path", full), ("fmt", f), ("label", label)):
            columns[name] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))
        tables.append(pa.table({k: columns[k] for k in SHARD_FIELDS}, schema=SHARD_SCHEMA))
    return Shards(pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table())


def _spans_in_order(files, threads: int, shard_rows: int, shard_bytes: int):
    """Each file's spans, in file order, ``threads`` files read at once; a bounded window of files in flight,
    so a million files never means a million pending futures."""
    window = 64 * threads
    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        for i in range(0, len(files), window):
            yield from pool.map(lambda x: _file_spans(x[0], x[1], shard_rows, shard_bytes), files[i:i + window])


def _file_spans(full: str, fmt: str, shard_rows: int, shard_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One file's shards as (start, stop, rows) int64 arrays; rows is -1 where unknown before reading (JSONL)."""
    fs, path = filesystem(full)
    try:
        spans = _spans(fs, path, fmt, shard_rows, shard_bytes)
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as e:  # names the file: pyarrow's does not
        raise ValueError(f"{full} is not a readable {fmt} file ({e}); fix or remove it, or point the job at the "
                         "files to use (a glob)") from e
    start, stop, rows = np.ascontiguousarray(np.array(spans, np.int64).reshape(-1, 3).T)
    return start, stop, rows


def _spans(fs, path: str, fmt: str, shard_rows: int, shard_bytes: int) -> list[tuple[int, int, int]]:
    if fmt == "parquet":
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        spans, start, rows = [], 0, 0
        for g, n in enumerate(groups):
            rows += n
            if rows >= shard_rows or g == len(groups) - 1:
                spans.append((start, g + 1, rows))
                start, rows = g + 1, 0
    elif fmt == "jsonl":
        size = fs.size(path)
        spans = [(a, min(a + shard_bytes, size), -1) for a in range(0, max(size, 1), shard_bytes)]
    else:
        n = _arrow_rows(fs, path) if fmt == "arrow" else len(_json_array(fs, path))
        spans = [(a, min(a + shard_rows, n), min(a + shard_rows, n) - a) for a in range(0, max(n, 1), shard_rows)]
    return spans


def _arrow_rows(fs, path) -> int:
    """Rows of an Arrow IPC stream, a batch at a time (the stream has no footer to read the count from)."""
    with fs.open(path, "rb") as fh:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(fh))


def read_shard(shard: Shard) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
    """Rows of a shard as (fallback id, row dict), plus (id, reason) for rows that could not be parsed."""
    fs, path = filesystem(shard.path)
    bad: list[tuple[str, str]] = []
    if shard.fmt == "parquet":
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            first = sum(pf.metadata.row_group(g).num_rows for g in range(shard.start))
            table = pf.read_row_groups(list(range(shard.start, shard.stop)))
        return [(f"{shard.label}:{first + i}", r) for i, r in enumerate(table.to_pylist())], bad
    if shard.fmt == "arrow":
        with fs.open(path, "rb") as fh:
            table = pa.ipc.open_stream(fh).read_all().slice(shard.start, shard.stop - shard.start)
        return [(f"{shard.label}:{shard.start + i}", r) for i, r in enumerate(table.to_pylist())], bad
    if shard.fmt == "json":
        rows = []
        for i, row in enumerate(_json_array(fs, path)[shard.start:shard.stop], start=shard.start):
            rid = f"{shard.label}:{i}"
            if isinstance(row, dict):
                rows.append((rid, row))
            else:
                bad.append((rid, f"JSON array element {i} is a {type(row).__name__}, not an object"))
        return rows, bad
    rows = []
    for offset, line in _jsonl_lines(fs, path, shard.start, shard.stop):
        rid = f"{shard.label}@{offset}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad.append((rid, f"malformed JSON line at byte {offset}: {e}"))
            continue
        if not isinstance(row, dict):
            bad.append((rid, f"JSON line at byte {offset} is a {type(row).__name__}, not an object"))
            continue
        rows.append((rid, row))
    return rows, bad


def _jsonl_lines(fs, path, start: int, stop: int):
    """Lines whose first byte lies in [start, stop) (a line straddling ``start`` belongs to the previous range)."""
    with fs.open(path, "rb") as fh:
        pos = start
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                pos = start + len(fh.readline())
        else:
            fh.seek(0)
        while pos < stop:
            raw = fh.readline()
            if not raw:
                break
            yield pos, raw  # bytes: json.loads decodes, and reports bad UTF-8 for this line only
            pos += len(raw)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a file so that readers see all of it or nothing (temp name, then move)."""
    fs, path = filesystem(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{posixpath.dirname(path)}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}"
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)


def write_table_atomic(url: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(url, buf.getvalue())


def write_json_atomic(url: str, obj) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(url: str):
    fs, path = filesystem(url)
    with fs.open(path, "r") as fh:
        return json.load(fh)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def join(url: str, *parts: str) -> str:
    return url.rstrip("/") + "/" + "/".join(parts)


def list_parts(url: str) -> set[str]:
    """Names (without .parquet) of finished parts in a directory: the whole resume state."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return set()
    return {posixpath.basename(f)[: -len(".parquet")] for f in fs.ls(path, detail=False)
            if f.endswith(".parquet") and not posixpath.basename(f).startswith(".")}


def read_parts(url: str, columns=None) -> pa.Table:
    fs, path = filesystem(url)
    files = sorted(f for f in fs.ls(path, detail=False) if f.endswith(".parquet")
                   and not posixpath.basename(f).startswith("."))
    if not files:
        return pa.table({})
    return pa.concat_tables([pq.read_table(f, filesystem=fs, columns=columns) for f in files])


def remove_temporaries(url: str) -> int:
    """Delete ``.tmp-*`` files a killed writer left under ``url``; returns how many."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return 0
    stale = [f for f in fs.find(path) if posixpath.basename(f).startswith(".tmp-")]
    for f in stale:
        fs.rm(f)
    return len(stale)


def remove_tree(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
