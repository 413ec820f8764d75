"""Inputs as shards (forvalue_ray.io, no Ray): every row of every input format is read exactly once whatever
the shard size, with ids stable and derived from the file and position; bad JSONL lines are set aside with
reasons; directory, glob and HF ``save_to_disk`` listings pick the right files; atomic writes leave no
temporaries behind."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forvalue_ray import io
from forvalue_ray.job import parts


def read_all(shards):
    rows, bad = [], []
    for s in shards:
        r, b = io.read_shard(s)
        rows += r
        bad += b
    return rows, bad


def assert_keys_ok(url, shards, **plan_kw):
    keys = [s.key for s in shards]
    assert len(set(keys)) == len(keys)
    assert keys == [s.key for s in io.plan_shards(url, **plan_kw)]  # planning is deterministic


# ---------------------------------------------------------------- JSONL byte ranges

BAD_UTF8 = b'{"text": "caf\xc3 \xff\xfe broken"}'
MALFORMED = b'{"text": "unterminated'
NOT_OBJECT = b'["a", "list"]'


def jsonl_lines(seed: int = 0) -> list[bytes]:
    """~200 lines of varying lengths: multi-byte UTF-8, an empty and a blank line, a CRLF line, bad lines."""
    rng = random.Random(seed)
    extras = ["", "é", "日本語のテキスト", "🙂🙃", "Ωμέγα", "\u2028sep", "tab\tand \"quotes\""]
    lines = []
    for i in range(200):
        text = "".join(rng.choice("abc xyz") for _ in range(rng.choice([0, 1, 3, 20, 90, 300])))
        row = {"i": i, "text": text + rng.choice(extras)}
        if i % 17 == 0:
            row["messages"] = [{"role": "user", "content": "ßüñ"}, {"role": "assistant", "content": text}]
        lines.append(json.dumps(row, ensure_ascii=rng.random() < 0.3).encode())
    lines[40] = b""  # empty line: skipped, neither a row nor rejected
    lines[41] = b"   \t"  # blank line: likewise
    lines[60] = lines[60] + b"\r"  # CRLF line ending
    lines[77] = MALFORMED
    lines[78] = BAD_UTF8
    lines[120] = NOT_OBJECT
    return lines


@pytest.fixture(params=[False, True], ids=["no-final-newline", "final-newline"])
def jsonl_file(tmp_path, request):
    lines = jsonl_lines()
    data = b"\n".join(lines) + (b"\n" if request.param else b"")
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line) + 1
    assert data[offsets[-1]:].rstrip(b"\n") == lines[-1]
    good = [(f"train.jsonl@{o}", json.loads(l)) for o, l in zip(offsets, lines)
            if l.strip() and l not in (MALFORMED, BAD_UTF8, NOT_OBJECT)]
    bad = {f"train.jsonl@{offsets[i]}": lines[i] for i in (77, 78, 120)}
    return path, good, bad


@pytest.mark.parametrize("shard_bytes", [1, 7, 64, 1000, 10**9])
def test_jsonl_every_line_read_exactly_once(jsonl_file, shard_bytes):
    path, good, bad = jsonl_file
    shards = io.plan_shards(str(path), shard_bytes=shard_bytes)
    size = path.stat().st_size
    assert len(shards) == -(-size // shard_bytes)
    assert [(s.start, s.stop) for s in shards] == [(a, min(a + shard_bytes, size)) for a in range(0, size, shard_bytes)]
    assert all(s.fmt == "jsonl" and s.label == "train.jsonl" and s.rows == -1 for s in shards)
    assert_keys_ok(str(path), shards, shard_bytes=shard_bytes)

    rows, rejected = read_all(shards)
    ids = [rid for rid, _ in rows] + [rid for rid, _ in rejected]
    assert len(ids) == len(set(ids))  # no line read twice, across rows and rejections
    assert rows == good  # every good line once, in file order, ids at the true byte offset of the line start
    assert {rid for rid, _ in rejected} == set(bad)
    reasons = dict(rejected)
    for rid, reason in reasons.items():
        offset = rid.rsplit("@", 1)[1]
        assert f"byte {offset}" in reason
    assert "malformed JSON" in reasons[next(k for k, v in bad.items() if v == MALFORMED)]
    assert "codec can't decode" in reasons[next(k for k, v in bad.items() if v == BAD_UTF8)]
    assert "not an object" in reasons[next(k for k, v in bad.items() if v == NOT_OBJECT)]


def test_jsonl_shard_boundaries_inside_multibyte_characters(tmp_path):
    # every boundary of a 1-byte plan falls inside a 4-byte character somewhere; each row still comes out once
    lines = [json.dumps({"t": "🙂" * k}, ensure_ascii=False).encode() for k in range(1, 12)]
    path = tmp_path / "emoji.jsonl"
    path.write_bytes(b"\n".join(lines))
    for b in (1, 2, 3, 5):
        rows, rejected = read_all(io.plan_shards(str(path), shard_bytes=b))
        assert not rejected
        assert [r["t"] for _, r in rows] == ["🙂" * k for k in range(1, 12)]


def test_jsonl_empty_file_and_single_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert read_all(io.plan_shards(str(empty), shard_bytes=4)) == ([], [])
    one = tmp_path / "one.jsonl"
    one.write_bytes(b'{"a": 1}')
    for b in (1, 3, 100):
        assert read_all(io.plan_shards(str(one), shard_bytes=b)) == ([("one.jsonl@0", {"a": 1})], [])


# ---------------------------------------------------------------- Parquet row groups

GROUP_SIZES = [3, 1, 5, 2, 7, 4, 1, 6]


@pytest.fixture
def parquet_file(tmp_path):
    path = tmp_path / "data.parquet"
    table = pa.table({"i": list(range(sum(GROUP_SIZES))),
                      "text": [f"row {i} ünï" for i in range(sum(GROUP_SIZES))],
                      "messages": [[{"role": "user", "content": str(i)}] for i in range(sum(GROUP_SIZES))]})
    with pq.ParquetWriter(path, table.schema) as w:
        start = 0
        for n in GROUP_SIZES:
            w.write_table(table.slice(start, n))
            start += n
    assert pq.ParquetFile(path).metadata.num_row_groups == len(GROUP_SIZES)
    return path, table.to_pylist()


@pytest.mark.parametrize("shard_rows", [1, 4, 6, 10, 10**6])
def test_parquet_shards_group_row_groups(parquet_file, shard_rows):
    path, expected = parquet_file
    shards = io.plan_shards(str(path), shard_rows=shard_rows)
    # contiguous row-group ranges covering the file; each closes once it holds >= shard_rows rows
    assert shards[0].start == 0 and shards[-1].stop == len(GROUP_SIZES)
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
    for s in shards:
        assert s.fmt == "parquet" and s.rows == sum(GROUP_SIZES[s.start:s.stop])
    assert all(s.rows >= shard_rows for s in shards[:-1])
    assert all(sum(GROUP_SIZES[s.start:s.stop - 1]) < shard_rows for s in shards)  # no larger than needed
    assert_keys_ok(str(path), shards, shard_rows=shard_rows)

    rows, rejected = read_all(shards)
    assert not rejected
    assert rows == [(f"data.parquet:{i}", r) for i, r in enumerate(expected)]


def test_parquet_without_row_groups(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    assert read_all(io.plan_shards(str(path), shard_rows=2)) == ([], [])


# ---------------------------------------------------------------- Hugging Face save_to_disk

HF_FEATURES = {"text": {"dtype": "string", "_type": "Value"}, "i": {"dtype": "int64", "_type": "Value"},
               "messages": [{"role": {"dtype": "string", "_type": "Value"},
                             "content": {"dtype": "string", "_type": "Value"}}]}


def write_hf_dataset(path, rows: list[dict], shard_sizes: list[int], split: str | None = "train") -> list[str]:
    """What ``Dataset.save_to_disk`` writes: Arrow IPC *stream* shards data-0000k-of-0000n.arrow (schema metadata
    ``huggingface`` carries the features), state.json (indent 2, sorted keys) and dataset_info.json."""
    path.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})
    names, start = [], 0
    for k, n in enumerate(shard_sizes):
        name = f"data-{k:05d}-of-{len(shard_sizes):05d}.arrow"
        with pa.OSFile(str(path / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.slice(start, n).to_batches(max_chunksize=3):  # several record batches
                w.write_batch(batch)
        names.append(name)
        start += n
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": split}
    (path / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"builder_name": None, "citation": "", "config_name": None, "dataset_name": None, "dataset_size": None,
            "description": "", "download_checksums": None, "download_size": None, "features": HF_FEATURES,
            "homepage": "", "license": "", "size_in_bytes": None, "splits": None, "supervised_keys": None,
            "version": None}
    (path / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return names


def hf_rows(n: int, tag: str = "") -> list[dict]:
    return [{"text": f"{tag}example {i} 日本", "i": i, "messages": [{"role": "user", "content": f"q{i}"},
                                                                   {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


@pytest.mark.parametrize("shard_rows", [1, 3, 4, 7, 100])
def test_hf_save_to_disk_rows(tmp_path, shard_rows):
    rows = hf_rows(12)
    names = write_hf_dataset(tmp_path / "ds", rows, [7, 5])
    assert names == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    inputs = io.list_inputs(str(tmp_path / "ds"))
    assert [(f, lab) for _, f, lab in inputs] == [("arrow", n) for n in names]  # no state/info JSON as data

    shards = io.plan_shards(str(tmp_path / "ds"), shard_rows=shard_rows)
    for label, n in zip(names, [7, 5]):
        mine = [s for s in shards if s.label == label]
        assert [(s.start, s.stop, s.rows) for s in mine] == [
            (a, min(a + shard_rows, n), min(a + shard_rows, n) - a) for a in range(0, n, shard_rows)]
    assert_keys_ok(str(tmp_path / "ds"), shards, shard_rows=shard_rows)

    got, rejected = read_all(shards)
    assert not rejected
    expected = [(f"{names[0]}:{i}", r) for i, r in enumerate(rows[:7])] + \
               [(f"{names[1]}:{i}", r) for i, r in enumerate(rows[7:])]
    assert got == expected  # chat messages come back as plain lists of dicts


def test_hf_save_to_disk_ignores_hf_metadata_even_with_forced_format(tmp_path):
    write_hf_dataset(tmp_path / "ds", hf_rows(4), [4])
    assert [lab for _, _, lab in io.list_inputs(str(tmp_path / "ds"), fmt="arrow")] == ["data-00000-of-00001.arrow"]


def test_hf_dataset_dict_metadata_is_never_data(tmp_path):
    root = tmp_path / "dd"
    write_hf_dataset(root / "train", hf_rows(5), [5], split="train")
    write_hf_dataset(root / "test", hf_rows(3, "t"), [3], split="test")
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    try:
        inputs = io.list_inputs(str(root))
    except ValueError as e:  # refusing with a message that points at a split is an acceptable fix too
        assert "split" in str(e)
        return
    assert all(f == "arrow" for _, f, _ in inputs), inputs


# ---------------------------------------------------------------- listings: directories, globs, errors

@pytest.fixture
def mixed_dir(tmp_path):
    root = tmp_path / "in"
    (root / "sub" / "deeper").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["p0", "p1"]}), root / "a.parquet")
    pq.write_table(pa.table({"text": ["q0"]}), root / "e.pq")
    pq.write_table(pa.table({"text": ["s0", "s1", "s2"]}), root / "sub" / "b.parquet")
    (root / "sub" / "c.jsonl").write_text('{"text": "c0"}\n{"text": "c1"}\n')
    (root / "sub" / "deeper" / "d.json").write_text('{"text": "d0"}\n')
    (root / "f.ndjson").write_text('{"text": "f0"}')
    # ignored: underscore/dot files (Spark markers, writers' temporaries) and unknown extensions in a directory
    (root / "_SUCCESS").write_text("")
    pq.write_table(pa.table({"text": ["meta"]}), root / "_metadata.parquet")
    pq.write_table(pa.table({"text": ["hidden"]}), root / ".tmp-1234-a.parquet")
    (root / "sub" / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    (root / "notes.txt").write_text("not data")
    (root / "README.md").write_text("# not data")
    return root


def test_directory_listing(mixed_dir):
    got = [(f, lab) for _, f, lab in io.list_inputs(str(mixed_dir))]
    assert got == [("parquet", "a.parquet"), ("parquet", "e.pq"), ("jsonl", "f.ndjson"), ("parquet", "sub/b.parquet"),
                   ("jsonl", "sub/c.jsonl"), ("jsonl", "sub/deeper/d.json")]
    assert all(full == str(mixed_dir / lab) for full, _, lab in io.list_inputs(str(mixed_dir)))
    rows, rejected = read_all(io.plan_shards(str(mixed_dir), shard_rows=1, shard_bytes=3))
    assert not rejected
    ids = [rid for rid, _ in rows]
    assert len(ids) == len(set(ids))
    assert sorted(r["text"] for _, r in rows) == ["c0", "c1", "d0", "f0", "p0", "p1", "q0", "s0", "s1", "s2"]
    assert ids[:3] == ["a.parquet:0", "a.parquet:1", "e.pq:0"]
    assert "sub/c.jsonl@15" in ids and "sub/deeper/d.json@0" in ids


def test_concurrent_planning_equals_the_serial_plan(tmp_path):
    """Files' metadata is read many at once, in windows of files: the plan is the one-file-at-a-time plan, in
    listing order, across window boundaries (130 files at 1 thread: windows of 64, 64 and 2)."""
    root = tmp_path / "many"
    root.mkdir()
    rng = random.Random(0)
    for i in range(130):
        n = rng.randint(1, 9)
        if i % 3:
            pq.write_table(pa.table({"text": [f"{i}-{j}" for j in range(n)]}), root / f"f{i:03d}.parquet",
                           row_group_size=2)
        else:
            (root / f"f{i:03d}.jsonl").write_text("".join(f'{{"text": "{i}-{j}"}}\n' for j in range(n)))
    serial = io.plan_shards(str(root), shard_rows=3, shard_bytes=40, threads=1)
    for threads in (2, 16):
        assert io.plan_shards(str(root), shard_rows=3, shard_bytes=40, threads=threads) == serial
    assert [s.label for s in serial] == sorted(s.label for s in serial)  # listing order, not completion order
    rows, _ = read_all(serial)
    assert len(rows) == len({r["text"] for _, r in rows}) == sum(
        len(pq.read_table(f)) if f.suffix == ".parquet" else len(f.read_text().splitlines()) for f in root.iterdir())


def test_glob_listing(mixed_dir):
    got = [(f, lab) for _, f, lab in io.list_inputs(str(mixed_dir / "sub" / "*.parquet"))]
    assert got == [("parquet", "b.parquet")]  # labelled relative to the glob's directory
    got = [lab for _, _, lab in io.list_inputs(str(mixed_dir / "*" / "*.parquet"))]
    assert got == ["sub/b.parquet"]
    got = [(f, lab) for _, f, lab in io.list_inputs(str(mixed_dir / "sub" / "**" / "?.json*"))]
    assert got == [("jsonl", "c.jsonl"), ("jsonl", "deeper/d.json")]
    rows, _ = read_all(io.plan_shards(str(mixed_dir / "sub" / "*.parquet")))
    assert [rid for rid, _ in rows] == ["b.parquet:0", "b.parquet:1", "b.parquet:2"]


def test_glob_ignores_underscore_and_dot_files(mixed_dir):
    got = [lab for _, _, lab in io.list_inputs(str(mixed_dir / "*.parquet"))]
    assert got == ["a.parquet"]
    got = [lab for _, _, lab in io.list_inputs(str(mixed_dir / "sub" / "*.jsonl"))]
    assert got == ["c.jsonl"]


def test_glob_root_with_question_mark_and_brackets(mixed_dir):
    for pattern in ("su?/*.parquet", "s[u]b/*.parquet"):
        got = [lab for _, _, lab in io.list_inputs(str(mixed_dir / pattern))]
        assert got == ["sub/b.parquet"], (pattern, got)


def test_single_file_and_errors(mixed_dir, tmp_path):
    assert io.list_inputs(str(mixed_dir / "sub" / "c.jsonl")) == [(str(mixed_dir / "sub" / "c.jsonl"), "jsonl",
                                                                   "c.jsonl")]
    with pytest.raises(ValueError, match="notes.txt"):  # an unknown extension named explicitly
        io.list_inputs(str(mixed_dir / "notes.txt"))
    with pytest.raises(ValueError, match="notes.txt"):  # ... or matched by a glob
        io.list_inputs(str(mixed_dir / "no*"))
    assert io.list_inputs(str(mixed_dir / "notes.txt"), fmt="jsonl")[0][1] == "jsonl"  # unless forced
    with pytest.raises(FileNotFoundError):
        io.list_inputs(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        io.plan_shards(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError):
        io.list_inputs(str(mixed_dir / "*.nothing"))
    (tmp_path / "only_junk").mkdir()
    (tmp_path / "only_junk" / "_SUCCESS").write_text("")
    with pytest.raises(FileNotFoundError):
        io.list_inputs(str(tmp_path / "only_junk"))
    (tmp_path / "broken").mkdir()
    pq.write_table(pa.table({"text": ["ok"]}), tmp_path / "broken" / "a.parquet")
    (tmp_path / "broken" / "b.parquet").write_bytes(b"PAR1 truncated by a failed upload")
    with pytest.raises(ValueError, match=r"broken/b\.parquet is not a readable parquet file"):
        io.plan_shards(str(tmp_path / "broken"))


# ---------------------------------------------------------------- atomic writes and temporaries

def test_write_table_atomic_and_remove_temporaries(tmp_path):
    out = tmp_path / "out" / "parts"
    table = pa.table({"id": ["a", "b"], "score": [1.0, 2.0]})
    io.write_table_atomic(str(out / "000000-x.parquet"), table)  # creates missing directories
    io.write_table_atomic(str(out / "000001-y.parquet"), table)
    io.write_table_atomic(str(out / "000001-y.parquet"), table.slice(0, 1))  # replaces whole
    io.write_json_atomic(str(tmp_path / "out" / "manifest.json"), {"b": 1, "a": [1, 2]})
    every = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not [p for p in every if p.name.startswith(".tmp-")]
    assert pq.read_table(out / "000000-x.parquet").equals(table)
    assert pq.read_table(out / "000001-y.parquet").num_rows == 1
    assert io.read_json(str(tmp_path / "out" / "manifest.json")) == {"a": [1, 2], "b": 1}
    assert io.list_parts(str(out)) == {"000000-x", "000001-y"}

    # a killed writer's leftovers: ignored by readers, deleted by remove_temporaries (nested ones too)
    (out / ".tmp-deadbeef-000002-z.parquet").write_bytes(b"PAR1 half written")
    (tmp_path / "out" / ".tmp-cafe-manifest.json").write_text("{")
    (out / "nested").mkdir()
    (out / "nested" / ".tmp-1-q.parquet").write_bytes(b"")
    assert io.list_parts(str(out)) == {"000000-x", "000001-y"}
    assert io.read_parts(str(out)).num_rows == 3
    assert io.remove_temporaries(str(tmp_path / "out")) == 3
    left = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert left == ["manifest.json", "parts/000000-x.parquet", "parts/000001-y.parquet"]
    assert io.remove_temporaries(str(tmp_path / "out")) == 0
    assert io.remove_temporaries(str(tmp_path / "never")) == 0
    assert io.list_parts(str(tmp_path / "never")) == set()


# ---- the plan -------------------------------------------------------------------------------------------------------


def test_plan_round_trips_through_its_parquet_table_and_reads_the_older_json(tmp_path, mixed_dir):
    """OUT/_plan.json holds settings and a count; the shards live in OUT/_plan_shards.parquet and read back equal.
    A plan of an older version (every shard in the JSON) still reads. The shard digest is a function of the shards."""
    shards = io.plan_shards(str(mixed_dir), shard_rows=2, shard_bytes=40)
    assert len(shards) > 3
    parts.RunOutput(str(tmp_path / "new")).save_plan({"kind": "scores", "settings": {"a": 1}}, shards)
    record = json.loads((tmp_path / "new" / "_plan.json").read_text())
    assert record["shard_count"] == len(shards) and "shards" not in record
    assert parts.RunOutput(str(tmp_path / "new")).load_plan() == (record, shards)
    table = pq.read_table(tmp_path / "new" / "_plan_shards.parquet")
    assert table["key"].to_pylist() == [s.key for s in shards]
    assert pa.types.is_dictionary(table.schema.field("path").type)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "_plan.json").write_text(json.dumps({"kind": "scores", "shards": [s.to_dict() for s in shards]}))
    assert parts.RunOutput(str(tmp_path / "old")).load_plan() == ({"kind": "scores"}, shards)
    assert parts.shards_digest(shards) == parts.shards_digest(list(shards))
    assert parts.shards_digest(shards) != parts.shards_digest(shards[:-1])
    assert parts.shards_digest(shards) != parts.shards_digest(shards[1:] + shards[:1])
