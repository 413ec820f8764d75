"""A study before building it: bfloat16 weights against float32 weights under CPU autocast(bfloat16) — matmuls in
bf16, weights, residual stream and norms in fp32 — for the agreement of the scores with float32 and their time.

    HF_HUB_OFFLINE=1 python benchmarks/bench_autocast.py --pool P3.parquet [--rows 128]

The rows and targets are drawn as `bench_dtype.py` draws them (POOL: Parquet with prompt, response, task, e.g. P3's
T0 training mixture, bigscience/P3 on the Hugging Face hub); mean-mode value scores, in one process, same batches.
Results: ``results/autocast_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from bench_dtype import cpu_model, encodable, sample


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pool", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--targets", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "autocast_cpu.json"))
    args = p.parse_args()
    from forvalue_ray import encode_rows, load_model, target_statistics
    from forvalue_ray.engine import Scorer

    torch.set_num_threads(os.cpu_count() or 1)
    train, target, task = sample(args.pool, args.rows, args.targets, None, 0)
    record = {"command": "python benchmarks/bench_autocast.py " + " ".join(
        a if not a.endswith(".parquet") else os.path.basename(a) for a in sys.argv[1:]),
        "cpu_model": cpu_model(), "threads": torch.get_num_threads(), "target_task": task, "variants": {}}
    scores = {}
    for name in ("float32", "bfloat16", "autocast"):
        vm = load_model(args.model, dtype=torch.bfloat16 if name == "bfloat16" else torch.float32)
        if name == "float32":
            train = encodable(vm, train, args.rows, args.max_length)
            target = encodable(vm, target, len(target), args.max_length)
        enc, tgt = (encode_rows(vm, rows, max_length=args.max_length) for rows in (train, target))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "autocast"):
            stats = target_statistics(vm, tgt, stats_form="dense")
            t0 = time.perf_counter()
            scores[name] = Scorer(vm, stats=stats, max_tokens=2048)(enc)["scores"][:, 0]
            record["variants"][name] = {"value_mean_s": time.perf_counter() - t0}
        print(name, record["variants"][name], flush=True)
    ref, k = scores["float32"], max(1, args.rows // 10)
    for name in ("bfloat16", "autocast"):
        s = scores[name]
        record["variants"][name].update(
            spearman_vs_float32=float(spearmanr(s, ref).statistic),
            rel_error=float(np.linalg.norm(s - ref) / np.linalg.norm(ref)),
            top10pct_overlap=len(set(np.argsort(-s)[:k]) & set(np.argsort(-ref)[:k])) / k)
        print(name, record["variants"][name], flush=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
