"""Sketch index storage: bytes per row against fidelity, raw and centered, and the score scan rate.

One model pass per task, dim and seed computes the centered sketches of train and target rows (the raw sketch is
c + TS(μ), so both estimators come from the same pass); μ is the mean gradient of a seeded sample of --center-rows
train rows, as `sketch --center` draws it. Every storage is then applied to the same sketches (compress → restore),
so the only differences between rows of the table are the estimator and the storage. Fidelity: per-target Spearman with the exact pairwise scores (mean and
min) and the class AUC (a train row of the target's class should outrank the others). Scan rate: `score`'s inner
loop (score_sketches) over one 4096-row part on one core, per storage (``--scan-only``: that alone).

    HF_HUB_OFFLINE=1 python benchmarks/bench_storage.py                 # SmolLM2, the three tasks, ~1.5 h on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/bench_storage.py --tasks sentence --dims 4096
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
from forvalue_ray.engine import Scorer, TargetStats
from forvalue_ray.sketch import STORAGES, SketchHashes, sketch_of_matrix
from tasks import make_task

p = argparse.ArgumentParser()
p.add_argument("--model", default="smollm2")
p.add_argument("--tasks", default="sentence,math,math_reason")
p.add_argument("--n-classes", type=int, default=10)
p.add_argument("--n-train-per-class", type=int, default=30)
p.add_argument("--n-val-per-class", type=int, default=3)
p.add_argument("--dims", default="1024,4096,16384")
p.add_argument("--center-rows", type=int, default=64, help="train rows whose mean gradient centers the sketches")
p.add_argument("--clusters", type=int, default=0,
               help="also measure a control variate per cluster: K means of the sample, each row centered on the "
                    "nearest (by exact distance) and keeping its exact dot with every mean")
p.add_argument("--seeds", default="0,1")
p.add_argument("--scan-rows", type=int, default=4096)
p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "storage.json"))
p.add_argument("--scan-only", action="store_true", help="measure the scan rates alone (--dims), kept with --out's "
                                                        "earlier fidelity results")
args = p.parse_args()
torch.set_num_threads(os.cpu_count() or 1)


def fidelity(approx: np.ndarray, exact: np.ndarray, tr_cls, va_cls) -> dict:
    rho = [spearmanr(approx[:, j], exact[:, j])[0] for j in range(exact.shape[1])]
    auc = [roc_auc_score(tr_cls == c, approx[:, j]) for j, c in enumerate(va_cls)]
    return {"spearman": float(np.mean(rho)), "spearman_min": float(np.min(rho)), "auc": float(np.mean(auc))}


def estimate(s_tr, s_va, storage, seed, tr_ids, va_ids, a_tr=None, a_va=None, mu_sq=0.0) -> np.ndarray:
    """Pairwise estimates through the index's own code: stored form, target columns, blocked scan."""
    columns = [str(j) for j in range(len(s_va))]
    targets = fv.sketch_targets(*fv.compress_sketches(s_va, storage, va_ids, seed), columns, columns,
                                center_dot=a_va, center_sq_norm=mu_sq)
    return fv.score_sketches(*fv.compress_sketches(s_tr, storage, tr_ids, seed), targets, center_dot=a_tr)


def bytes_per_row(dim: int, storage: str) -> int:
    if storage == "binary":  # 8 signs a byte, s and ‖x‖
        return dim // 8 + 8
    return dim * np.dtype(storage).itemsize + (4 if storage == "int8" else 0)


def centers_of(sample: list, k: int) -> TargetStats:
    """μ (the sample's mean gradient) and, with k > 0, the means of k clusters of the sample: [1 + k, V, d]. The
    clusters come from sketches with a seed no measurement uses, so the centers are independent of the hashes."""
    mu = fv.target_statistics(vm, sample, stats_form="dense")
    if not k:
        return mu
    from sklearn.cluster import KMeans

    labels = KMeans(k, n_init=10, random_state=0).fit_predict(fv.sketches(vm, sample, dim=4096, seed=10**6))
    means = fv.target_statistics(vm, sample, groups=[f"c{c}" for c in labels], stats_form="dense")
    return TargetStats(torch.cat([mu.stats, means.stats]), ["all"] + means.names, False, mu.counts + means.counts)


def gram(stats: torch.Tensor) -> np.ndarray:
    """⟨μ_k, μ_l⟩, exact in float64."""
    n = len(stats)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = float((stats[i].double() * stats[j].double()).sum())
    return out


def nearest(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Each row's nearest center in exact Frobenius distance, ‖G − μ_k‖² = ‖G‖² − 2⟨G, μ_k⟩ + ‖μ_k‖²."""
    return np.argmin(np.diag(g)[None, :] - 2 * a, axis=1)


def clustered(s_tr, a_tr, s_va, a_va, ts, g, storage, seed, tr_ids, va_ids) -> np.ndarray:
    """⟨G, G'⟩ ≈ ⟨TS(G) − TS(μ_k), TS(G') − TS(μ_l)⟩ + ⟨G, μ_l⟩ + ⟨G', μ_k⟩ − ⟨μ_k, μ_l⟩: unbiased for centers
    fixed before hashing, with variance ∝ ‖G − μ_k‖²‖G' − μ_l‖²."""
    k_tr, k_va = nearest(a_tr, g), nearest(a_va, g)
    x = fv.restore_sketches(*fv.compress_sketches(s_tr - ts[k_tr], storage, tr_ids, seed))
    t = fv.restore_sketches(*fv.compress_sketches(s_va - ts[k_va], storage, va_ids, seed))
    return x @ t.T + a_tr[:, k_va] + a_va[:, k_tr].T - g[np.ix_(k_tr, k_va)]


results = {"model": args.model, "tasks": {}, "scan": {}}
if args.scan_only and os.path.exists(args.out):
    with open(args.out) as fh:
        results = {**json.load(fh), "scan": {}}
vm = None if args.scan_only else fv.load_model(args.model)
for task in [] if args.scan_only else args.tasks.split(","):
    train, val = make_task(task, n_classes=args.n_classes, n_train_per_class=args.n_train_per_class,
                           n_val_per_class=args.n_val_per_class)
    tr_ids, va_ids = [r["id"] for r in train], [r["id"] for r in val]
    tr_cls, va_cls = np.array([r["class"] for r in train]), [r["class"] for r in val]
    t0 = time.time()
    exact = np.asarray(fv.pairwise_scores(vm, train, val), dtype=np.float64)
    rows = [{"dim": None, "seed": None, "estimator": "exact", "storage": "exact", "bytes_per_row": None,
             **fidelity(exact, exact, tr_cls, va_cls)}]
    sample = [train[i] for i in sorted(np.random.default_rng(0).choice(len(train), args.center_rows, replace=False))]
    centers = centers_of(sample, args.clusters)
    g = gram(centers.stats)
    for dim in map(int, args.dims.split(",")):
        for seed in map(int, args.seeds.split(",")):
            # one pass per split: the sketch TS(G) and the exact ⟨G, μ_k⟩ for every center (μ first)
            (s_tr, a_tr), (s_va, a_va) = ((r["sketch"], r["scores"]) for r in (
                Scorer(vm, stats=centers, sketch_dim=dim, sketch_seed=seed)(fv.encode_rows(vm, split))
                for split in (train, val)))
            hashes = SketchHashes.make(dim, seed, *centers.stats.shape[1:])
            ts = np.stack([sketch_of_matrix(m, hashes).float().numpy() for m in centers.stats])
            for storage in STORAGES:
                estimators = [("raw", 0, estimate(s_tr, s_va, storage, seed, tr_ids, va_ids)),
                              ("centered", 8, estimate(s_tr - ts[0], s_va - ts[0], storage, seed, tr_ids, va_ids,
                                                       a_tr[:, 0], a_va[:, 0], g[0, 0]))]
                if args.clusters:  # + a float64 dot per center and the center's index
                    estimators.append((f"clustered-{args.clusters}", 8 * len(g) + 1,
                                       clustered(s_tr, a_tr, s_va, a_va, ts, g, storage, seed, tr_ids, va_ids)))
                for estimator, extra, approx in estimators:
                    rows.append({"dim": dim, "seed": seed, "estimator": estimator, "storage": storage,
                                 "bytes_per_row": bytes_per_row(dim, storage) + extra,
                                 **fidelity(approx, exact, tr_cls, va_cls)})
                    print(json.dumps({"task": task, **rows[-1]}), flush=True)
    results["tasks"][task] = {"rows": rows, "n_train": len(train), "n_val": len(val), "center_rows": len(sample),
                              "seconds": round(time.time() - t0, 1)}

torch.set_num_threads(1)
rng = np.random.default_rng(0)
for dim in map(int, args.dims.split(",")):
    sk = rng.normal(size=(args.scan_rows, dim)).astype(np.float32)
    center_dot = rng.normal(size=args.scan_rows)
    names = [str(k) for k in range(10)]
    targets = fv.sketch_targets(rng.normal(size=(10, dim)), None, names, names, center_dot=rng.normal(size=10),
                                center_sq_norm=1.0)
    for storage in STORAGES:
        values, scale = fv.compress_sketches(sk, storage, [str(i) for i in range(len(sk))], 0)
        with threadpool_limits(1):
            t0 = time.perf_counter()
            fv.score_sketches(values, scale, targets, center_dot)
            dt = time.perf_counter() - t0
        results["scan"][f"{dim}/{storage}"] = {"rows_per_s_per_core": round(len(sk) / dt),
                                               "mb_per_s_per_core": round(values.nbytes / dt / 1e6)}
        print(json.dumps({"scan": f"{dim}/{storage}", **results["scan"][f"{dim}/{storage}"]}), flush=True)

os.makedirs(os.path.dirname(args.out), exist_ok=True)
with open(args.out, "w") as fh:
    json.dump(results, fh, indent=1)
print("wrote", args.out)
