"""Scale rehearsal: how planning, resume, select and verify grow with the corpus (no model needed).

1. plan + resume: an input of N shards (Parquet row groups across a few files; or N small files, one shard each,
   locally, through a local S3 server (moto), and locally behind a fixed wait per file opened, read one file at
   a time and many at once) — planning time, writing and re-reading the plan (_plan.json +
   _plan_shards.parquet), listing the finished parts (resume state), the plan's size on disk and the driver's peak
   RSS.
2. select and verify over a finished run of R rows: input Parquet plus score parts, rejected parts, plan and
   run.json in the output layout, fabricated here (the code paths that read them are the product's): wall time,
   driver peak RSS, the peak RSS summed over Ray's worker processes, and the growth exponent in R.

    python benchmarks/bench_scale.py --shards 10000 100000 --files 10000 --rows 1000000 10000000
    → benchmarks/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RESULTS = Path(__file__).resolve().parent / "results" / "scale_cpu.json"
SHARD_ROWS = 8192
LATENCY_MS = 30  # a typical object-store round trip within a region


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WorkerRss:
    """Peak of the summed RSS of this process's Ray (raylet, workers: its descendants), sampled every 0.2 s."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total / 2**20)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child(fn: str, *args) -> dict:
    """Run one measurement in a fresh process so its peak RSS is its own."""
    out = subprocess.run([sys.executable, __file__, "--child", fn, *map(str, args)], capture_output=True, text=True)
    results = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not results:
        raise RuntimeError(f"{fn} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(results[-1])


# ---- 1. plan + resume ---------------------------------------------------------------------------------------------


def make_sharded_input(root: Path, shards: int, files: int = 10) -> Path:
    data = root / f"input-{shards}"
    data.mkdir(parents=True, exist_ok=True)
    per_file = shards // files
    table = pa.table({"id": pa.array([f"r{i}" for i in range(per_file)]), "text": pa.array(["x"] * per_file)})
    for f in range(files):
        pq.write_table(table, data / f"part-{f:03d}.parquet", row_group_size=1)  # one row group = one shard
    return data


def make_small_files(root: Path, files: int) -> Path:
    data = root / f"files-{files}"
    data.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        pq.write_table(pa.table({"id": [f"r{f}"], "text": ["x"]}), data / f"part-{f:06d}.parquet")
    return data


def local_s3():
    """moto's S3 server on a free port, its endpoint exported for this process and the measurements' children."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def upload(local: Path, url: str) -> str:
    import boto3

    client, (bucket, prefix) = boto3.client("s3"), url[len("s3://"):].split("/", 1)
    for f in sorted(local.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return url


class SlowOpen:
    """A filesystem whose every open first waits ``latency`` seconds: an object store's round trip, without the
    CPU of a local S3 server sharing the benchmark's cores."""

    def __init__(self, fs, latency: float):
        self.fs, self.latency = fs, latency

    def open(self, *args, **kw):
        time.sleep(self.latency)
        return self.fs.open(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def measure_plan(data: str, out: str, latency_ms: str = "0", threads: str = "") -> dict:
    """Planning, writing and re-reading the plan (as a resumed run does), and listing the finished parts."""
    from unittest import mock

    from forvalue_ray import io
    from forvalue_ray.job import ValueConfig, parts

    latency, real = float(latency_ms) / 1000, io.filesystem

    def slow_filesystem(url):
        fs, path = real(url)
        return SlowOpen(fs, latency), path

    plan_kw = {"threads": int(threads)} if threads else {}
    with mock.patch.object(io, "filesystem", slow_filesystem) if latency else contextlib.nullcontext():
        t0 = time.time()
        shards = io.plan_shards(data, shard_rows=1, **plan_kw)
        plan_s = time.time() - t0
    t0 = time.time()
    cfg = ValueConfig(train=data, target="fabricated", out=out, shard_rows=1)
    parts.RunOutput(out).save_plan(parts.plan_record("scores", cfg.result_fields(), shards), shards)
    write_s = time.time() - t0
    planned = parts.shards_digest(shards)
    del shards  # a resumed run holds the plan it reads, not a second copy
    t0 = time.time()
    _, shards = parts.RunOutput(out).load_plan()
    read_s = time.time() - t0
    assert parts.shards_digest(shards) == planned
    fs, base = io.filesystem(io.join(out, "scores"))
    fs.makedirs(base, exist_ok=True)
    for key in shards[: len(shards) // 2].keys():  # half finished: the resume listing
        fs.touch(f"{base}/{key}.parquet")
    t0 = time.time()
    done = io.list_parts(io.join(out, "scores"))
    list_s = time.time() - t0
    plan_bytes = sum(fs.size(io.filesystem(io.join(out, f))[1]) for f in (parts.PLAN_FILE, parts.PLAN_SHARDS_FILE))
    return {"shards": len(shards), "plan_threads": plan_kw.get("threads", io.PLAN_THREADS),
            "plan_seconds": round(plan_s, 2), "plan_write_seconds": round(write_s, 2),
            "plan_read_seconds": round(read_s, 2), "resume_list_seconds": round(list_s, 2),
            "finished_listed": len(done), "plan_files_mib": round(plan_bytes / 2**20, 2),
            "driver_peak_rss_mib": round(peak_rss_mib(), 1)}


# ---- 2. select / verify over a fabricated finished run ----------------------------------------------------------


def fabricate_run(root: Path, rows: int) -> tuple[Path, Path]:
    """An input of ``rows`` rows in SHARD_ROWS-row groups and a finished `value` output over it."""
    from forvalue_ray import io
    from forvalue_ray.job import ValueConfig, parts

    data, out = root / f"data-{rows}", root / f"run-{rows}"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_file = 1_000_000
    for f in range(0, rows, per_file):
        n = min(per_file, rows - f)
        pq.write_table(pa.table({"id": pa.array([f"row-{i:09d}" for i in range(f, f + n)]),
                                 "text": pa.array(["some training text"] * n),
                                 "group": pa.array((np.arange(f, f + n) % 7).astype(str))}),
                       data / f"part-{f // per_file:04d}.parquet", row_group_size=SHARD_ROWS)
    shards = io.plan_shards(str(data), shard_rows=SHARD_ROWS)
    cfg = ValueConfig(train=str(data), target="fabricated", out=str(out), shard_rows=SHARD_ROWS)
    parts.RunOutput(str(out)).save_plan(parts.plan_record("scores", {**cfg.result_fields(), "fabricated": True},
                                                            shards), shards)
    tokens = 0
    for s in shards:
        ids = pq.ParquetFile(s.path).read_row_groups(list(range(s.start, s.stop)), columns=["id"])["id"]
        n = len(ids)
        meta = {"shard": s.key, "rows_read": n, "scored": n, "rejected": 0, "tokens": 10 * n}
        tokens += 10 * n
        part = pa.table({"id": ids, "score": pa.array(rng.standard_normal(n)), "n_tokens": pa.array([10] * n),
                         "nll": pa.array(rng.random(n))})
        parts.write_with_meta(str(out / "scores" / f"{s.key}.parquet"), part, meta)
        io.write_table_atomic(str(out / "rejected" / f"{s.key}.parquet"),
                              pa.table({"id": pa.array([], pa.string()), "reason": pa.array([], pa.string())}))
    io.write_json_atomic(str(out / "run.json"), {"counts": {"rows_read": rows, "scored": rows, "rejected": 0,
                                                            "tokens": tokens, "shards": len(shards)}})
    return data, out


def measure_command(which: str, out: str, sel: str) -> dict:
    from forvalue_ray import job
    from forvalue_ray.job.executor import init_ray

    init_ray(None)
    with WorkerRss() as workers:
        t0 = time.time()
        if which == "verify":
            problems, counts = job.verify(out)
            assert not problems, problems
            result = counts
        else:
            result = job.select(out, None, sel, top_fraction=0.1, per_group="group" if which == "select-per-group"
                                else None)
        seconds = time.time() - t0
    return {"command": which, "seconds": round(seconds, 2), "driver_peak_rss_mib": round(peak_rss_mib(), 1),
            "workers_peak_rss_mib": round(workers.peak, 1), "result": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--files", type=int, nargs="*", default=[], help="small files, one shard each: local and S3")
    ap.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--commands", nargs="*", default=["verify", "select", "select-per-group"])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn, *rest = args.child
        print(json.dumps(measure_plan(*rest) if fn == "plan" else measure_command(fn, *rest)))
        return
    root = Path(tempfile.mkdtemp(prefix="fv-scale-"))
    # merged into the committed results: a measurement replaces the one of the same size (and command)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"plan": [], "commands": []}
    results["machine"] = f"{os.cpu_count()} CPU cores"
    results["plan"] = [r for r in results["plan"] if r["shards"] not in args.shards]
    results["plan_small_files"] = [r for r in results.get("plan_small_files", []) if r["shards"] not in args.files]
    results["commands"] = [r for r in results["commands"]
                           if not (r["rows"] in args.rows and r["command"] in args.commands)]

    def save():  # after every measurement: a long run stopped early keeps what it measured
        for which in args.commands:
            pts = [(r["rows"], r["seconds"]) for r in results["commands"] if r["command"] == which]
            if len(pts) >= 2:
                (r0, t0), (r1, t1) = pts[0], pts[-1]
                results.setdefault("growth_exponent", {})[which] = round(float(np.log(t1 / t0) / np.log(r1 / r0)), 2)
        RESULTS.write_text(json.dumps(results, indent=1))

    try:
        for n in args.shards:
            data = make_sharded_input(root, n)
            results["plan"].append(child("plan", data, root / f"plan-out-{n}"))
            results["plan"].sort(key=lambda r: r["shards"])
            print(results["plan"][-1], flush=True)
            save()
        for n in args.files:
            local = make_small_files(root, n)
            server = local_s3()
            try:
                for where, data, out in (("local", local, root / f"files-out-{n}"),
                                         ("s3", upload(local, f"s3://bench/files-{n}"), f"s3://bench/files-out-{n}")):
                    results["plan_small_files"].append({"where": where, **child("plan", data, out)})
                    print(results["plan_small_files"][-1], flush=True)
                    save()
            finally:
                server.stop()
            for threads in (1, None):  # local files behind a fixed round trip per open: what concurrency buys
                where = f"local + {LATENCY_MS} ms per open"
                results["plan_small_files"].append({"where": where, **child(
                    "plan", local, root / f"files-out-{n}-{threads}", LATENCY_MS, threads or "")})
                print(results["plan_small_files"][-1], flush=True)
                save()
        for rows in args.rows:
            t0 = time.time()
            _, out = fabricate_run(root, rows)
            print(f"fabricated {rows:,} rows in {time.time() - t0:.0f} s", flush=True)
            for which in args.commands:
                r = {"rows": rows, **child(which, out, root / f"sel-{which}-{rows}")}
                results["commands"].append(r)
                results["commands"].sort(key=lambda r: (r["command"], r["rows"]))
                print(r, flush=True)
                save()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results.get("growth_exponent", {})))


if __name__ == "__main__":
    main()
