"""The Ray job against the in-process core, and its memory as the corpus grows.

    python benchmarks/bench_job.py [--model DIR|smollm2] [--rows 1000,10000,100000]

- rows/s of `forvalue-ray value` on a local Ray (cluster start-up excluded: Ray is started first) against the
  in-process core (`Scorer`) on the same rows; one model actor, so the comparison is like for like;
- the driver's and the largest worker's peak RSS during the job (sampled every 0.2 s) as rows grow: both should
  stay flat (the in-process core run holds every row, so it runs after the job and is not sampled).
The plan and resume state at 10^4–10^6 shards are measured by bench_scale.py.
Without --model, a tiny random Llama (the tests' config) is saved and used.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq


def corpus(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "the a cat dog sat ran on under mat log red blue big small quick slow".split()
    return [{"id": f"r{i}", "text": " ".join(rng.choice(words, rng.integers(6, 14)))} for i in range(n)]


class PeakRSS(threading.Thread):
    """Largest RSS of any Ray worker process, and of this (driver) process, sampled until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.driver_peak, self.stop = 0, 0, False
        self.me = psutil.Process()

    def run(self):
        while not self.stop:
            self.driver_peak = max(self.driver_peak, self.me.memory_info().rss)
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                try:
                    if any("ray::" in c or "default_worker.py" in c for c in (p.info["cmdline"] or [])):
                        self.peak = max(self.peak, p.info["memory_info"].rss)
                except (psutil.Error, TypeError):
                    pass
            time.sleep(0.2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--rows", default="1000,10000,100000")
    p.add_argument("--shard-rows", type=int, default=4096)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "job_cpu.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    from forvalue_ray import load_model
    from forvalue_ray.api import encode_rows, target_statistics
    from forvalue_ray.cli import main as cli
    from forvalue_ray.engine import Scorer

    tmp = tempfile.mkdtemp(prefix="fv-bench-job-")
    model = args.model
    if model is None:
        from forvalue_ray.testing.tiny import tiny_model

        vm = tiny_model("llama", dtype=torch.float32)
        model = os.path.join(tmp, "model")
        vm.model.save_pretrained(model)
        vm.tokenizer.save_pretrained(model)
    torch.set_num_threads(1)
    vm = load_model(model)
    target = corpus(8, seed=1)
    pq.write_table(pa.Table.from_pylist(target), os.path.join(tmp, "target.parquet"))
    stats = target_statistics(vm, target)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = []
    for n in [int(x) for x in args.rows.split(",")]:
        rows = corpus(n)
        train = os.path.join(tmp, f"train{n}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), train, row_group_size=min(args.shard_rows, 4096))
        sampler = PeakRSS()
        sampler.start()
        t0 = time.perf_counter()
        rc = cli(["value", "--model", model, "--train", train, "--target", os.path.join(tmp, "target.parquet"),
                  "--out", os.path.join(tmp, f"out{n}"), "--shard-rows", str(args.shard_rows), "--no-progress",
                  "--overwrite"])
        job_s = time.perf_counter() - t0
        sampler.stop = True
        sampler.join()
        assert rc == 0
        t0 = time.perf_counter()  # after the job: the core holds every row, which would inflate the driver's RSS
        Scorer(vm, stats=stats)(encode_rows(vm, rows))  # the core on the same rows, tokenization included
        core_s = time.perf_counter() - t0
        res = {"rows": n, "core_rows_per_s": n / core_s, "job_rows_per_s": n / job_s, "job_vs_core": core_s / job_s,
               "driver_peak_rss_during_job_mib": sampler.driver_peak / 2**20,
               "worker_peak_rss_mib": sampler.peak / 2**20}
        results.append(res)
        print(json.dumps(res), flush=True)
    ray.shutdown()
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/bench_job.py " + " ".join(sys.argv[1:]), "results": results}, f,
                  indent=2)


if __name__ == "__main__":
    main()
