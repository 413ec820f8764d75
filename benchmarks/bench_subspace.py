"""A study for a smaller index: data-dependent factor projections of G = Σ_t α_t h_tᵀ, against the TensorSketch.

    HF_HUB_OFFLINE=1 python benchmarks/bench_subspace.py [--tasks sentence,math] [--fit-rows 64] [--pool P3.parquet]

Not the product's index: an estimator measured here before it is built. Each centered row X = G − μ (μ the mean
gradient of --fit-rows seeded train rows, as `sketch --center` draws them) is split by two projections fitted on
those same rows — B [k2, d]: the top eigenvectors of Σ_i (G_i − μ)ᵀ(G_i − μ) (the hidden side); A [k1, V]: the top
left singular vectors of the stacked (G_i − μ)Bᵀ (the vocabulary side):

    X = Π_A X Π_B + R,   ⟨X, X'⟩ = ⟨A X Bᵀ, A X' Bᵀ⟩ + ⟨R, R'⟩   (the cross terms vanish: Π² = Π)

A row keeps the k1·k2 coordinates A X Bᵀ exactly and a TensorSketch of the residual, TS(R) = TS(X) − TS(Π_A X Π_B),
in D more numbers; the estimate ⟨coords, coords'⟩ + ⟨TS(R), TS(R')⟩ + ⟨G, μ⟩ + ⟨G', μ⟩ − ‖μ‖² is unbiased over the
hashes for any fitted subspace (the subspace only moves energy out of the sketched part). D = 0 is a pure
projection: no variance, biased towards the subspace. D = dim with k1 = k2 = 0 is today's centered index.

Each config also names a storage (``k1xk2+D:storage``): int8 by default, or ``binary`` (`sketch --storage binary`:
the signs of the rotated row and two float32 per row, 1 bit per number, so D = 8192 is a 1 KB row), scored against
a float32 target index or, as ``binary/binary``, a binary one. Every estimate is scored through the index's own
code (`compress_sketches` of the concatenated vector → `sketch_targets` → `score_sketches`). Fidelity as in bench_storage.py: per-target Spearman against exact pairwise
scores (mean, min), class AUC. ``--pool``: also a real mixture, 10 seeded tasks of a prompt/response Parquet with a
`task` column (e.g. P3's T0 training mixture, bigscience/P3 on the Hugging Face hub), 30 train and 3 target rows each,
the class being the task; rows with short responses (≤ 300 characters: the study holds every token's [V] error in
memory) and prompts (≤ 2,000). Results: ``results/subspace.json``.
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

import forvalue_ray as fv
from forvalue_ray.engine import log_sum_exp, plan_batches, valued_tokens
from forvalue_ray.readout import error_chunk
from forvalue_ray.sketch import SketchHashes, sketch_of_matrix, sketch_spectrum, spectrum_to_sketch
from tasks import make_task

# k1xk2+D[:storage]: about 1 KB and 4 KB per row (int8 unless named; binary: the index in rotated signs, scored
# against a float32 target index; binary/binary: the target index binary too)
CONFIGS = ("0x0+1024,32x16+512,64x16+0,32x32+0,0x0+4096,64x16+3072,32x32+3072,64x32+2048,64x64+0,"
           "0x0+8192:binary,0x0+8192:binary/binary,8x8+8128:binary,0x0+32768:binary,0x0+32768:binary/binary")


class Tokens:
    """The valued tokens of rows: hidden states h [T, d], errors α [T, V] (exact, float32) and the row of each."""

    def __init__(self, vm, rows):
        enc = fv.encode_rows(vm, rows)
        hs, alphas, segs = [], [], []
        with torch.no_grad():
            for idx in plan_batches([len(r.input_ids) for r in enc], 4096):
                vt = valued_tokens(vm, [enc[i] for i in idx])
                lse = log_sum_exp(vm, vt, 8192)
                hs.append(vt.h.float())
                alphas.append(error_chunk(vm.head, vt.h, vt.y, lse, 0, vm.head.vocab_size, torch.float32))
                segs.append(torch.as_tensor(np.asarray(idx))[vt.seg.cpu()])
        self.h, self.alpha, self.seg, self.n = torch.cat(hs), torch.cat(alphas), torch.cat(segs), len(rows)

    def rows(self, per_token: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.n, *per_token.shape[1:], dtype=torch.float64).index_add_(0, self.seg, per_token.double())

    def gradient_sum(self) -> torch.Tensor:
        return self.alpha.T @ self.h

    def center_dot(self, mu: torch.Tensor) -> np.ndarray:
        return self.rows(((self.alpha @ mu) * self.h).sum(1)).numpy()

    def coords(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """A G Bᵀ per row, flattened [n, k1·k2]."""
        pa, pb = self.alpha @ A.T, self.h @ B.T
        return self.rows((pa[:, :, None] * pb[:, None, :]).reshape(len(pa), -1))

    def tensor_sketch(self, hashes: SketchHashes, A=None, B=None) -> torch.Tensor:
        """TS(G) per row, or TS(Π_A G Π_B) with projections."""
        a, h = (self.alpha, self.h) if A is None else ((self.alpha @ A.T) @ A, (self.h @ B.T) @ B)
        cs = torch.zeros(len(a), hashes.dim).index_add_(1, hashes.vocab_buckets, a * hashes.vocab_signs).double()
        return spectrum_to_sketch(sketch_spectrum(cs, h.double(), hashes, self.seg, self.n), hashes)


def pairwise_exact(tr: Tokens, va: Tokens) -> np.ndarray:
    k = (tr.alpha @ va.alpha.T) * (tr.h @ va.h.T)
    return torch.zeros(va.n, tr.n, dtype=torch.float64).index_add_(0, va.seg, tr.rows(k).T).T.numpy()


def fit_subspace(sample: Tokens, mu: torch.Tensor, k1: int, k2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B: top-k2 eigenvectors of Σ_i (G_i − μ)ᵀ(G_i − μ), from each row's tokens (no [V, d] per row);
    A: top-k1 left singular vectors of [(G_i − μ)Bᵀ]_i."""
    d = mu.shape[1]
    gram, mu64 = torch.zeros(d, d, dtype=torch.float64), mu.double()
    parts = []
    for i in range(sample.n):
        m = sample.seg == i
        a, h = sample.alpha[m].double(), sample.h[m].double()
        a_mu = a @ mu64  # [t, d]
        gram += h.T @ ((a @ a.T) @ h) - h.T @ a_mu - a_mu.T @ h
        parts.append((a, h))
    gram += sample.n * (mu64.T @ mu64)
    evals, evecs = torch.linalg.eigh(gram)
    B = evecs[:, torch.argsort(evals, descending=True)[:k2]].T.float()
    mu_b = mu @ B.T
    stacked = torch.cat([a.float().T @ (h.float() @ B.T) - mu_b for a, h in parts], 1)  # [V, n·k2]
    U = torch.linalg.svd(stacked, full_matrices=False)[0]
    return U[:, :k1].T.contiguous(), B


def index_rows(t: Tokens, mu: torch.Tensor, k1: int, k2: int, dim: int, seed: int, A=None, B=None) -> np.ndarray:
    """The stored vector of each centered row: [A X Bᵀ, TS(X) − TS(Π_A X Π_B)]."""
    blocks = []
    if k1:
        blocks.append(t.coords(A, B) - (A.double() @ mu.double() @ B.double().T).reshape(-1))
    if dim:
        hashes = SketchHashes.make(dim, seed, *mu.shape)
        residual = t.tensor_sketch(hashes) - sketch_of_matrix(mu, hashes)
        if k1:
            proj_mu = A.T.double() @ (A.double() @ mu.double() @ B.double().T) @ B.double()
            residual = residual - t.tensor_sketch(hashes, A, B) + sketch_of_matrix(proj_mu, hashes)
        blocks.append(residual)
    return torch.cat(blocks, 1).float().numpy()


def estimate(x_tr, x_va, a_tr, a_va, mu_sq, seed, tr_ids, va_ids, storage="int8", target_storage="int8"):
    """Pairwise estimates through the index's own code (stored forms, target columns, blocked scan)."""
    columns = [str(j) for j in range(len(x_va))]
    targets = fv.sketch_targets(*fv.compress_sketches(x_va, target_storage, va_ids, seed), columns, columns,
                                center_dot=a_va, center_sq_norm=mu_sq)
    return fv.score_sketches(*fv.compress_sketches(x_tr, storage, tr_ids, seed), targets, center_dot=a_tr)


def parse_config(config: str) -> tuple[int, int, int, str, str]:
    """'k1xk2+D[:storage[/target storage]]' → (k1, k2, D, storage, target storage)."""
    shape, _, stored = config.partition(":")
    k, dim = shape.split("+")
    storage, _, target_storage = (stored or "int8").partition("/")
    return (*map(int, k.split("x")), int(dim), storage,
            target_storage or ("float32" if storage == "binary" else storage))


def bytes_per_row(k1: int, k2: int, dim: int, storage: str) -> int:
    """The stored numbers, their scale(s) and the float64 ⟨G, μ⟩."""
    n = k1 * k2 + dim
    return (n // 8 + 8 if storage == "binary" else n + 4) + 8


def fidelity(approx: np.ndarray, exact: np.ndarray, tr_cls, va_cls) -> dict:
    """Pairwise targets (a column per target row): per-target Spearman against exact (mean, min) and class AUC.
    Mean targets: the scores are linear in the target, so a group's column (`--mode groups`) is the mean of its rows'
    columns and the one mean (`--mode mean`) the mean of all: per-class Spearman (mean, min) and AUC, and the mean's
    Spearman."""
    rho = [spearmanr(approx[:, j], exact[:, j])[0] for j in range(exact.shape[1])]
    auc = [roc_auc_score(tr_cls == c, approx[:, j]) for j, c in enumerate(va_cls)]
    classes = sorted(set(va_cls))
    members = [[j for j, c in enumerate(va_cls) if c == k] for k in classes]
    group_rho = [spearmanr(approx[:, m].mean(1), exact[:, m].mean(1))[0] for m in members]
    group_auc = [roc_auc_score(tr_cls == k, approx[:, m].mean(1)) for k, m in zip(classes, members)]
    return {"spearman": float(np.mean(rho)), "spearman_min": float(np.min(rho)), "auc": float(np.mean(auc)),
            "groups_spearman": float(np.mean(group_rho)), "groups_spearman_min": float(np.min(group_rho)),
            "groups_auc": float(np.mean(group_auc)),
            "mean_spearman": float(spearmanr(approx.mean(1), exact.mean(1))[0])}


def fit_sample(train: list[dict], keep_per_class: int | None, n: int) -> tuple[list[dict], list[dict]]:
    """(train, the sample μ and the subspace are fitted on): n seeded rows of train itself, or with keep_per_class,
    n seeded rows of what lies beyond the first keep_per_class rows of each class (held out of train: the corpus's
    distribution, none of the scored rows, as a sample of a large corpus is)."""
    rng = np.random.default_rng(0)
    if keep_per_class is None:
        return train, [train[i] for i in sorted(rng.choice(len(train), n, replace=False))]
    seen, kept, rest = {}, [], []
    for r in train:
        seen[r["class"]] = seen.get(r["class"], 0) + 1
        (kept if seen[r["class"]] <= keep_per_class else rest).append(r)
    return kept, [rest[i] for i in sorted(rng.choice(len(rest), n, replace=False))]


def pool_task(path: str, n_train: int, n_val: int, seed: int = 0, n_tasks: int = 10):
    """A task of a real mixture: n_train + n_val rows of each of n_tasks seeded tasks, the class being the task."""
    import pyarrow.parquet as pq

    df = pq.read_table(path, columns=["id", "task", "prompt", "response"]).to_pandas()
    df = df[(df["response"].str.len().between(1, 300)) & (df["prompt"].str.len() <= 2000)]
    rng = np.random.default_rng(seed)
    counts = df["task"].value_counts()
    tasks = sorted(rng.choice(sorted(counts[counts >= n_train + n_val].index), n_tasks, replace=False))
    train, val = [], []
    for task in tasks:
        rows = df[df["task"] == task].sample(n_train + n_val, random_state=seed)
        rows = [{"id": r.id, "prompt": r.prompt, "response": r.response, "class": task} for r in rows.itertuples()]
        train += rows[:n_train]
        val += rows[n_train:]
    return train, val


def plot_path(out: str) -> str:
    """plots/<results file's name>_fidelity_vs_bytes.png"""
    stem = os.path.splitext(os.path.basename(out))[0]
    return os.path.join(os.path.dirname(__file__), "plots", f"{stem}_fidelity_vs_bytes.png")


def plot(results: dict, path: str) -> None:
    """Per task: mean per-target Spearman and AUC − exact against bytes per row, every seed a point; the centered
    TensorSketch in int8, the fitted subspace with a sketched residual, a pure projection, the TensorSketch in
    binary storage (scored against a float32 target index, and against a binary one), and the subspace with its
    residual in binary storage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.4), squeeze=False)
    int8 = lambda r: r.get("storage", "int8") == "int8"
    kinds = {"TensorSketch, int8": lambda r: int8(r) and r["k1"] == 0,
             "subspace + residual sketch, int8": lambda r: int8(r) and r["k1"] and r["dim"],
             "pure projection (biased)": lambda r: int8(r) and r["k1"] and not r["dim"],
             "TensorSketch, binary (float32 targets)": lambda r: r.get("storage") == "binary" and not r["k1"]
             and r["target_storage"] != "binary",
             "TensorSketch, binary (binary targets)": lambda r: r.get("target_storage") == "binary",
             "subspace + residual sketch, binary": lambda r: r.get("storage") == "binary" and r["k1"]}
    for col, task in enumerate(tasks):
        rows = results["tasks"][task]["rows"]
        exact_auc = rows[0]["auc"]
        for (label, keep), marker, shift in zip(kinds.items(), "osx^vD", (0, 0.04, -0.04, 0.02, -0.02, 0.06)):
            pts = [r for r in rows[1:] if keep(r)]
            if not pts:
                continue
            x = [r.get("bytes_per_row", r.get("int8_bytes_per_row")) * (1 + shift) for r in pts]
            axes[0, col].scatter(x, [r["spearman"] for r in pts], marker=marker, label=label, alpha=0.8)
            axes[1, col].scatter(x, [r["auc"] - exact_auc for r in pts], marker=marker, alpha=0.8)
        axes[0, col].set_title(task)
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks([1036, 4108], ["1 KB", "4 KB"])
        axes[1, col].axhline(0, color="grey", lw=0.8)
        axes[1, col].set_xlabel("bytes per row")
    axes[0, 0].set_ylabel("mean per-target Spearman vs exact")
    axes[1, 0].set_ylabel("AUC − exact AUC")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="sentence,math", help="DataInf-style tasks; '' for --pool alone")
    p.add_argument("--n-train-per-class", type=int, default=30)
    p.add_argument("--n-val-per-class", type=int, default=3)
    p.add_argument("--pool", default=None, help="also a real mixture: Parquet with task, prompt, response")
    p.add_argument("--fit-rows", type=int, default=64, help="train rows for μ and the fitted projections")
    p.add_argument("--fit-heldout", action="store_true",
                   help="draw the --fit-rows from more rows of the same classes, none of them scored")
    p.add_argument("--configs", default=CONFIGS, help="k1xk2+D, comma-separated")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "subspace.json"))
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from --out")
    args = p.parse_args()
    if args.plot_only:
        with open(args.out) as f:
            return plot(json.load(f), plot_path(args.out))
    torch.set_num_threads(os.cpu_count() or 1)
    vm = fv.load_model(args.model, dtype=torch.float32)
    results = {"model": args.model, "fit_rows": args.fit_rows, "fit_heldout": args.fit_heldout, "tasks": {}}
    pool_name = os.path.splitext(os.path.basename(args.pool))[0] if args.pool else None
    if os.path.exists(args.out):  # a second command (e.g. --pool) adds its tasks to the first one's
        with open(args.out) as f:
            earlier = json.load(f)
        if [earlier.get(k) for k in ("model", "fit_rows", "fit_heldout")] == [args.model, args.fit_rows,
                                                                             args.fit_heldout]:
            results["tasks"] = earlier["tasks"]
    for task in [t for t in args.tasks.split(",") if t] + ([pool_name] if args.pool else []):
        t0 = time.time()
        per_class = args.n_train_per_class + (-(-args.fit_rows // 10) if args.fit_heldout else 0)
        train, val = (pool_task(args.pool, per_class, args.n_val_per_class) if task == pool_name else
                      make_task(task, n_classes=10, n_train_per_class=per_class, n_val_per_class=args.n_val_per_class))
        train, fit = fit_sample(train, args.n_train_per_class if args.fit_heldout else None, args.fit_rows)
        tr, va, sa = Tokens(vm, train), Tokens(vm, val), Tokens(vm, fit)
        tr_cls, va_cls = np.array([r["class"] for r in train]), [r["class"] for r in val]
        ids = [r["id"] for r in train], [r["id"] for r in val]
        exact = pairwise_exact(tr, va)
        mu = sa.gradient_sum() / sa.n
        mu_sq, a_tr, a_va = float(mu.double().pow(2).sum()), tr.center_dot(mu), va.center_dot(mu)
        rows = [{"config": "exact", **fidelity(exact, exact, tr_cls, va_cls)}]
        bases = {}
        for config in args.configs.split(","):
            k1, k2, dim, storage, target_storage = parse_config(config)
            if k1 and (k1, k2) not in bases:
                bases[(k1, k2)] = fit_subspace(sa, mu, k1, k2)
            for seed in map(int, args.seeds.split(",")) if dim else [0]:
                A, B = bases.get((k1, k2), (None, None))
                x_tr, x_va = (index_rows(t, mu, k1, k2, dim, seed, A, B) for t in (tr, va))
                approx = estimate(x_tr, x_va, a_tr, a_va, mu_sq, seed, *ids, storage, target_storage)
                rows.append({"config": config, "k1": k1, "k2": k2, "dim": dim, "seed": seed, "storage": storage,
                             "target_storage": target_storage, "bytes_per_row": bytes_per_row(k1, k2, dim, storage),
                             **fidelity(approx, exact, tr_cls, va_cls)})
                print(task, json.dumps(rows[-1]), flush=True)
        results["tasks"][task] = {"rows": rows, "n_train": len(train), "n_val": len(val),
                                  "classes": sorted({str(c) for c in va_cls}),
                                  "seconds": round(time.time() - t0, 1)}
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    plot(results, plot_path(args.out))


if __name__ == "__main__":
    main()
