"""bfloat16 weights and bfloat16-autocast (float32 weights, residual stream and readout; the layers' matmuls in
bf16) against float32 on a CPU: speed of the forward and of the valuation, and agreement of the scores, on real
prompt/response rows.

    HF_HUB_OFFLINE=1 python benchmarks/bench_dtype.py --pool P3.parquet [--rows 256] [--targets 32] [--job-rows 512]
        [--dtypes float32,bfloat16,bfloat16-autocast]

POOL is Parquet with `prompt`, `response` and `task` (e.g. P3's T0 training mixture, public on the Hugging Face
hub as bigscience/P3). From it, seeded: --rows training rows drawn over every task, and --targets target rows of
one task (--target-task, default the pool's most common). For each dtype, in one process, on the same encoded
rows and the same batches (the engine's own plan):

- plain forward: the model's logits and a float32 log-softmax (what any per-token loss needs at least);
- value: ``Scorer`` against the mean target statistics (the job's default mode) and, separately, against the
  targets one by one (pairwise);
- the job: ``forvalue-ray value --dtype D`` on --job-rows rows of a local Ray started beforehand (start-up
  excluded), rows/s and tok/s.

Agreement of each dtype with fp32: Spearman of the mean scores, per-target Spearman of the pairwise scores (mean and
min), and the overlap of the top 10% by the mean score. The record states the CPU and what ``--dtype auto``
chooses on it. Results: ``results/dtype_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from scipy.stats import spearmanr


def sample(pool: str, n_rows: int, n_targets: int, target_task: str | None, seed: int):
    table = pq.read_table(pool, columns=["prompt", "response", "task"]).to_pandas()
    task = target_task or table["task"].value_counts().index[0]
    rng = np.random.default_rng(seed)
    in_task = np.flatnonzero(table["task"].to_numpy() == task)
    targets = rng.choice(in_task, n_targets, replace=False)  # each must fit --max-length: checked by encodable()
    rest = np.setdiff1d(np.arange(len(table)), targets)
    train = rng.choice(rest, min(len(rest), 2 * n_rows), replace=False)  # 2x: rows too long are dropped
    rows = lambda idx: [{"id": f"r{i}", "prompt": table["prompt"][i], "response": table["response"][i]}
                        for i in idx]
    return rows(train), rows(targets), task


def encodable(vm, rows: list[dict], n: int, max_length: int) -> list[dict]:
    """The first n rows with a valued response token within max_length (a longer prompt leaves none: the job
    rejects such a row, so neither side of the comparison sees it)."""
    from forvalue_ray import encode_rows
    from forvalue_ray.encode import RowError

    keep = []
    for row in rows:
        try:
            encode_rows(vm, [row], max_length=max_length)
        except RowError:
            continue
        keep.append(row)
        if len(keep) == n:
            return keep
    raise SystemExit(f"only {len(keep)} rows of the sample fit --max-length {max_length}; need {n}")


def forward_seconds(vm, encoded, max_tokens: int) -> float:
    """A plain forward with logits over the engine's batches of the same rows."""
    from forvalue_ray.engine import plan_batches

    t0 = time.perf_counter()
    with torch.no_grad():
        for idx in plan_batches([len(r.input_ids) for r in encoded], max_tokens):
            width = max(len(encoded[i].input_ids) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for j, i in enumerate(idx):
                n = len(encoded[i].input_ids)
                ids[j, :n], mask[j, :n] = torch.as_tensor(encoded[i].input_ids), 1
            with vm.matmul_precision():
                logits = vm.model(input_ids=ids.to(vm.device), attention_mask=mask.to(vm.device)).logits
            torch.log_softmax(logits.float(), -1)
    return time.perf_counter() - t0


def job_rate(model: str, dtype: str, rows: list[dict], target: list[dict], tokens: int, max_length: int,
             tmp: str) -> dict:
    from forvalue_ray.cli import main as cli
    from forvalue_ray.io import read_parts

    train, tgt = os.path.join(tmp, "train.parquet"), os.path.join(tmp, "target.parquet")
    pq.write_table(pa.Table.from_pylist(rows), train)
    pq.write_table(pa.Table.from_pylist(target), tgt)
    out = os.path.join(tmp, f"out-{dtype}")
    t0 = time.perf_counter()
    rc = cli(["value", "--model", model, "--train", train, "--target", tgt, "--out", out, "--dtype", dtype,
              "--max-length", str(max_length), "--no-progress", "--overwrite"])
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"the job failed with --dtype {dtype} (exit {rc})")
    scored = read_parts(os.path.join(out, "scores"), columns=["id"]).num_rows
    if scored != len(rows):
        raise SystemExit(f"the job scored {scored} of {len(rows)} rows with --dtype {dtype}")
    return {"rows": len(rows), "seconds": seconds, "rows_per_s": len(rows) / seconds, "tok_per_s": tokens / seconds}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pool", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--targets", type=int, default=32)
    p.add_argument("--target-task", default=None)
    p.add_argument("--job-rows", type=int, default=512, help="rows for the job's rate; 0 skips the job")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per batch (the engine's plan)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtypes", default="float32,bfloat16,bfloat16-autocast",
                   help="comma-separated; the first must be float32 (the reference)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "dtype_cpu.json"))
    args = p.parse_args()
    args.dtypes = args.dtypes.split(",")
    if args.dtypes[0] != "float32":
        p.error("--dtypes must start with float32, the reference the others are compared with")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from forvalue_ray import encode_rows, load_model, target_statistics
    from forvalue_ray.engine import Scorer, build_reference
    from forvalue_ray.model import choose_dtype, cpu_bf16_flags, resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    train, target, task = sample(args.pool, max(args.rows, args.job_rows), args.targets, args.target_task, args.seed)
    auto, reason = choose_dtype("cpu", resolve_model(args.model, None)[0])
    record = {"command": "python benchmarks/bench_dtype.py " + " ".join(  # the pool by name, not where it lies here
                  os.path.basename(a) if a.endswith(".parquet") else a for a in sys.argv[1:]),
              "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
              "cpu_bf16_flags": sorted(cpu_bf16_flags()), "threads": torch.get_num_threads(),
              "auto_dtype": auto, "auto_reason": reason, "target_task": task,
              "rows": args.rows, "targets": args.targets, "max_length": args.max_length, "dtypes": {}}
    scores, job_tokens = {}, 0
    for name in args.dtypes:
        vm = load_model(args.model, dtype=name)
        if name == "float32":
            train = encodable(vm, train, max(args.rows, args.job_rows), args.max_length)
            target = encodable(vm, target, len(target), args.max_length)
        enc = encode_rows(vm, train[:args.rows], max_length=args.max_length)
        tgt = encode_rows(vm, target, max_length=args.max_length)
        tokens = sum(len(r.input_ids) for r in enc)
        job_tokens = sum(len(r.input_ids) for r in encode_rows(vm, train[:args.job_rows], max_length=args.max_length))
        forward_seconds(vm, enc[:8], args.max_tokens)  # warm-up: one-time kernel selection
        fwd = forward_seconds(vm, enc, args.max_tokens)
        stats = target_statistics(vm, tgt, stats_form="dense")
        t0 = time.perf_counter()
        mean = Scorer(vm, stats=stats, max_tokens=args.max_tokens)(enc)["scores"][:, 0]
        value = time.perf_counter() - t0
        reference = build_reference(vm, tgt)
        t0 = time.perf_counter()
        pairwise = Scorer(vm, reference=reference, max_tokens=args.max_tokens)(enc)["pairwise"]
        pair = time.perf_counter() - t0
        scores[name] = (mean, pairwise)
        record["dtypes"][name] = {
            "tokens": tokens, "forward_s": fwd, "forward_tok_per_s": tokens / fwd,
            "value_mean_s": value, "value_mean_tok_per_s": tokens / value, "value_over_forward": value / fwd,
            "value_pairwise_s": pair, "pairwise_over_forward": pair / fwd}
        print(name, json.dumps(record["dtypes"][name]), flush=True)
    if args.job_rows:
        import ray

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory(prefix="fv-bench-dtype-") as tmp:
            for name in args.dtypes:
                record["dtypes"][name]["job"] = job_rate(args.model, name, train[:args.job_rows], target,
                                                         job_tokens, args.max_length, tmp)
                print(name, "job", json.dumps(record["dtypes"][name]["job"]), flush=True)
        ray.shutdown()
    m32, p32 = scores["float32"]
    f32 = record["dtypes"]["float32"]
    k = max(1, len(m32) // 10)
    top = lambda s: set(np.argsort(-s)[:k])
    record["agreement_with_float32"], record["speedup_over_float32"] = {}, {}
    for name in args.dtypes[1:]:
        (m, pw), d = scores[name], record["dtypes"][name]
        rho = [spearmanr(pw[:, j], p32[:, j]).statistic for j in range(p32.shape[1])]
        record["agreement_with_float32"][name] = {
            "spearman_mean_scores": float(spearmanr(m, m32).statistic),
            "spearman_pairwise_mean": float(np.mean(rho)), "spearman_pairwise_min": float(np.min(rho)),
            "top10pct_overlap": len(top(m) & top(m32)) / k,
            "rel_error_mean_scores": float(np.linalg.norm(m - m32) / np.linalg.norm(m32))}
        record["speedup_over_float32"][name] = {
            "forward": f32["forward_s"] / d["forward_s"], "value_mean": f32["value_mean_s"] / d["value_mean_s"],
            "value_pairwise": f32["value_pairwise_s"] / d["value_pairwise_s"],
            **({"job": f32["job"]["seconds"] / d["job"]["seconds"]} if args.job_rows else {})}
    print(json.dumps({"agreement_with_float32": record["agreement_with_float32"],
                      "speedup_over_float32": record["speedup_over_float32"]}, indent=1))
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    main()
