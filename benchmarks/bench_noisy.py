"""Noisy-data detection: which valuation finds the training rows whose response was corrupted?

    python benchmarks/bench_noisy.py [--n-train-per-class 10] [--n-val-per-class 2] [--noise 0.2]

Sentence and math tasks (forvalue_ray.tasks) with a fraction of training responses corrupted; exact pairwise
For-Value of every training row against clean validation rows (SmolLM2-135M), then the AUC of −value against
the corruption flag for: the mean over all validation rows (the paper's protocol), the mean over validation
rows of the row's own class, and the contrast own-class − other-class. Rows are valued on all text tokens
and on response tokens only.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from forvalue_ray import load_model, pairwise_scores
from forvalue_ray.tasks import make_task


def detectors(S, cls, vcls):
    own = np.array([S[i, vcls == c].mean() for i, c in enumerate(cls)])
    other = np.array([S[i, vcls != c].mean() for i, c in enumerate(cls)])
    return {"mean": S.mean(1), "own_class": own, "own_minus_other": own - other}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="sentence,math")
    p.add_argument("--n-train-per-class", type=int, default=10)
    p.add_argument("--n-val-per-class", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "noisy.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vm = load_model()
    results = []
    for task in args.tasks.split(","):
        train, val = make_task(task, n_train_per_class=args.n_train_per_class,
                               n_val_per_class=args.n_val_per_class, noise=args.noise)
        flag = np.array([r["corrupted"] for r in train])
        cls, vcls = np.array([r["class"] for r in train]), np.array([r["class"] for r in val])
        for form in ("text", "prompt_response"):
            t0 = time.time()
            S = pairwise_scores(vm, train, val, form=form)
            for name, value in detectors(S, cls, vcls).items():
                order = np.argsort(-value)
                res = {"task": task, "form": form, "detector": name, "auc": roc_auc_score(flag, -value),
                       "clean_in_top10pct": float(1 - flag[order[: len(order) // 10]].mean()),
                       "clean_in_top20pct": float(1 - flag[order[: len(order) // 5]].mean()),
                       "seconds": time.time() - t0}
                results.append(res)
                print(json.dumps(res), flush=True)
    meta = {"n_train": len(flag), "n_val": len(vcls), "noise": args.noise, "model": "SmolLM2-135M-Instruct",
            "command": "python benchmarks/bench_noisy.py"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print("| task | tokens valued | mean (paper) | own class | own − other | clean in top 20% (own − other) |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        for form in ("text", "prompt_response"):
            r = {x["detector"]: x for x in results if x["task"] == task and x["form"] == form}
            print(f"| {task} | {'all' if form == 'text' else 'response'} | {r['mean']['auc']:.3f} | "
                  f"{r['own_class']['auc']:.3f} | {r['own_minus_other']['auc']:.3f} | "
                  f"{r['own_minus_other']['clean_in_top20pct']:.2f} |")


if __name__ == "__main__":
    main()
