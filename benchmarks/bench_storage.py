"""Sketch index storage: bytes per row against fidelity, and the score scan rate.

One model pass per task computes the exact pairwise For-Value and the float sketches of train and target rows at
each dim and seed; every storage is then applied to the same sketches (compress → restore), so the only difference
between rows of the table is the storage. Fidelity: per-target Spearman with the exact pairwise scores (mean and
min) and the class AUC (a train row of the target's class should outrank the others). Scan rate: `score`'s inner
loop (score_sketches) over one 4096-row part on one core, per storage.

    HF_HUB_OFFLINE=1 python benchmarks/bench_storage.py                      # SmolLM2, sentence task, ~15 min CPU
    HF_HUB_OFFLINE=1 python benchmarks/bench_storage.py --tasks sentence,math --n-train-per-class 90
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

import forvalue_ray as fv
from forvalue_ray.sketch import STORAGES
from forvalue_ray.tasks import make_task

p = argparse.ArgumentParser()
p.add_argument("--model", default="smollm2")
p.add_argument("--tasks", default="sentence")
p.add_argument("--n-classes", type=int, default=10)
p.add_argument("--n-train-per-class", type=int, default=30)
p.add_argument("--n-val-per-class", type=int, default=3)
p.add_argument("--dims", default="4096,16384")
p.add_argument("--seeds", default="0,1")
p.add_argument("--scan-rows", type=int, default=4096)
p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "storage.json"))
args = p.parse_args()
torch.set_num_threads(os.cpu_count() or 1)


def fidelity(approx: np.ndarray, exact: np.ndarray, tr_cls, va_cls) -> dict:
    rho = [spearmanr(approx[:, j], exact[:, j])[0] for j in range(exact.shape[1])]
    auc = [roc_auc_score(tr_cls == c, approx[:, j]) for j, c in enumerate(va_cls)]
    return {"spearman": float(np.mean(rho)), "spearman_min": float(np.min(rho)), "auc": float(np.mean(auc))}


def stored(sk: np.ndarray, storage: str, ids: list[str], seed: int) -> np.ndarray:
    return fv.restore_sketches(*fv.compress_sketches(sk, storage, ids, seed))


def bytes_per_row(dim: int, storage: str) -> int:
    return dim * np.dtype(storage).itemsize + (4 if storage == "int8" else 0)


vm = fv.load_model(args.model)
results = {"model": args.model, "tasks": {}, "scan": {}}
for task in args.tasks.split(","):
    train, val = make_task(task, n_classes=args.n_classes, n_train_per_class=args.n_train_per_class,
                           n_val_per_class=args.n_val_per_class)
    tr_ids, va_ids = [r["id"] for r in train], [r["id"] for r in val]
    tr_cls, va_cls = np.array([r["class"] for r in train]), [r["class"] for r in val]
    t0 = time.time()
    exact = np.asarray(fv.pairwise_scores(vm, train, val), dtype=np.float64)
    rows = [{"dim": None, "seed": None, "storage": "exact", "bytes_per_row": None,
             **fidelity(exact, exact, tr_cls, va_cls)}]
    for dim in map(int, args.dims.split(",")):
        for seed in map(int, args.seeds.split(",")):
            s_tr = np.asarray(fv.sketches(vm, train, dim=dim, seed=seed))
            s_va = np.asarray(fv.sketches(vm, val, dim=dim, seed=seed))
            for storage in STORAGES:
                approx = stored(s_tr, storage, tr_ids, seed) @ stored(s_va, storage, va_ids, seed).T
                rows.append({"dim": dim, "seed": seed, "storage": storage,
                             "bytes_per_row": bytes_per_row(dim, storage),
                             **fidelity(approx, exact, tr_cls, va_cls)})
                print(json.dumps({"task": task, **rows[-1]}), flush=True)
    results["tasks"][task] = {"rows": rows, "n_train": len(train), "n_val": len(val),
                              "seconds": round(time.time() - t0, 1)}

torch.set_num_threads(1)
rng = np.random.default_rng(0)
for dim in map(int, args.dims.split(",")):
    sk = rng.normal(size=(args.scan_rows, dim)).astype(np.float32)
    targets = rng.normal(size=(dim, 10))
    for storage in STORAGES:
        values, scale = fv.compress_sketches(sk, storage, [str(i) for i in range(len(sk))], 0)
        with threadpool_limits(1):
            t0 = time.perf_counter()
            fv.score_sketches(values, scale, targets, normalize=False)
            dt = time.perf_counter() - t0
        results["scan"][f"{dim}/{storage}"] = {"rows_per_s_per_core": round(len(sk) / dt),
                                               "mb_per_s_per_core": round(values.nbytes / dt / 1e6)}
        print(json.dumps({"scan": f"{dim}/{storage}", **results["scan"][f"{dim}/{storage}"]}), flush=True)

os.makedirs(os.path.dirname(args.out), exist_ok=True)
with open(args.out, "w") as fh:
    json.dump(results, fh, indent=1)
print("wrote", args.out)
