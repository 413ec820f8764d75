"""Build the selection benchmark's files from public fine-tuning data: one pool, and per target task its target
(the few rows a user has) and test rows, both held out of the pool.

    python benchmarks/selection_data.py --p3 p3-t0-mixture.parquet --gsm8k-train gsm8k-train.parquet \
        --gsm8k-test gsm8k-test.parquet --out data/selection [--pool-per-task 100] [--targets gsm8k,yelp_review_full,sciq]

Inputs (Parquet with id, task, template, prompt, response): P3's T0 training mixture (BigScience's public prompt
collection, bigscience/P3 on the Hugging Face hub, 36 tasks) and GSM8K (openai/gsm8k, train and test). Rows longer
than ``--max-chars`` characters are left out, so that nearly every row fits the benchmark's 256 tokens.

The pool draws the same number of rows from every task (GSM8K included): each target task is ~1/37 of it, so a
selection of 5% can be at most about half on-task. Per target: 64 target rows and up to 300 test rows from the
target task's rows not in the pool (GSM8K: targets from train, test from gsm8k-test).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--p3", required=True)
    p.add_argument("--gsm8k-train", required=True)
    p.add_argument("--gsm8k-test", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--pool-per-task", type=int, default=100)
    p.add_argument("--targets", default="gsm8k,yelp_review_full,sciq")
    p.add_argument("--target-rows", type=int, default=64)
    p.add_argument("--test-rows", type=int, default=300)
    p.add_argument("--max-chars", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    cols = ["id", "task", "template", "prompt", "response"]
    p3 = pq.read_table(args.p3).select(cols)
    train = pa.concat_tables([p3, pq.read_table(args.gsm8k_train).select(cols)])
    size = pc.add(pc.utf8_length(train["prompt"]), pc.utf8_length(train["response"]))
    train = train.filter(pc.and_(pc.less_equal(size, args.max_chars), pc.greater(pc.utf8_length(train["response"]), 0)))
    targets = args.targets.split(",")
    tasks = train["task"].to_numpy(zero_copy_only=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool_idx, held = [], {}
    for task in sorted(set(tasks)):
        rows = rng.permutation(np.nonzero(tasks == task)[0])
        pool_idx += rows[:args.pool_per_task].tolist()
        held[task] = rows[args.pool_per_task:]
    pool = train.take(sorted(pool_idx))
    pq.write_table(pool, out / "pool.parquet")
    print(f"pool: {pool.num_rows} rows, {len(set(tasks))} tasks")
    for task in targets:
        if task not in held:
            raise SystemExit(f"unknown task {task!r}")
        rest = held[task]
        pq.write_table(train.take(sorted(rest[:args.target_rows])), out / f"{task}_target.parquet")
        if task == "gsm8k":
            test = pq.read_table(args.gsm8k_test).select(cols)
            test = test.take(sorted(rng.choice(test.num_rows, min(args.test_rows, test.num_rows), replace=False)))
        else:
            test = train.take(sorted(rest[args.target_rows:args.target_rows + args.test_rows]))
        pq.write_table(test, out / f"{task}_test.parquet")
        print(f"{task}: {min(len(rest), args.target_rows)} target rows, {test.num_rows} test rows")


if __name__ == "__main__":
    main()
