"""Scores with the readout's products in the model's bf16 (tensor-core products) against the same products in
fp32, on SmolLM2-135M over the DataInf-style tasks (CPU).

    HF_HUB_OFFLINE=1 python benchmarks/bench_precision.py [--n-train-per-class 10] [--n-val-per-class 2]

For each task: the bf16 model scores the training rows against the validation rows — mean mode (dense Ḡ), groups
by class (factored Ḡ: 10 groups of few tokens), pairwise — once with the products in bf16 (the product) and once in
fp32 (:func:`bench_flops.fp32_products`, how they ran before), on the same bf16 hidden states (the forward is
computed once and reused). The fp32 model's scores show the size of the whole bf16 effect beside it.
Results: ``results/flops_precision.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch
from scipy import stats as sps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_flops import fp32_products  # noqa: E402


def memoize_forward(vm):
    """Reuse the model's hidden states for a batch already seen (same ids and mask): the two product
    precisions are compared on the same forward."""
    forward, cache = vm.hidden_states, {}

    def hidden_states(input_ids, attention_mask, **vision):
        key = (input_ids.numpy().tobytes(), attention_mask.numpy().tobytes(), tuple(input_ids.shape))
        if key not in cache:
            cache[key] = forward(input_ids, attention_mask, **vision)
        return cache[key]

    vm.hidden_states = hidden_states
    return vm


def scores(vm, train, target, classes) -> dict:
    from forvalue_ray import target_statistics
    from forvalue_ray.engine import Scorer, build_reference

    mean = target_statistics(vm, target, stats_form="dense")
    groups = target_statistics(vm, target, groups=classes, stats_form="factored")
    both = Scorer(vm, stats=mean, reference=build_reference(vm, target))(train)
    return {"mean (dense)": both["scores"][:, 0], "groups (factored)": Scorer(vm, stats=groups)(train)["scores"],
            "pairwise": both["pairwise"]}


def compare(got: np.ndarray, ref: np.ndarray) -> dict:
    got, ref = np.atleast_2d(got.T).T, np.atleast_2d(ref.T).T  # [rows, targets]
    rho = [sps.spearmanr(got[:, j], ref[:, j]).statistic for j in range(ref.shape[1])]
    return {"rel_error_fro": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "rel_error_max": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "spearman_min": float(np.min(rho)), "spearman_mean": float(np.mean(rho))}


def main():
    from forvalue_ray import encode_rows, load_model
    from tasks import make_task

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="sentence,math,math_reason")
    p.add_argument("--n-train-per-class", type=int, default=10)
    p.add_argument("--n-val-per-class", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "flops_precision.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    vm32 = load_model(args.model)
    vm16 = memoize_forward(load_model(args.model, dtype=torch.bfloat16))
    results = []
    for task in args.tasks.split(","):
        train_rows, val_rows = make_task(task, n_train_per_class=args.n_train_per_class,
                                         n_val_per_class=args.n_val_per_class)
        classes = [r["class"] for r in val_rows]
        res = {}
        for name, vm, fp32 in (("bf16 model, bf16 products", vm16, False), ("bf16 model, fp32 products", vm16, True),
                               ("fp32 model", vm32, False)):
            train, target = (encode_rows(vm, [{"id": r["id"], "text": r["text"]} for r in rows], form="text")
                             for rows in (train_rows, val_rows))
            with fp32_products() if fp32 else contextlib.nullcontext():
                res[name] = scores(vm, train, target, classes)
        for path in res["fp32 model"]:
            row = {"task": task, "path": path, "rows": len(train_rows), "targets": len(val_rows),
                   "bf16_products_vs_fp32_products": compare(res["bf16 model, bf16 products"][path],
                                                             res["bf16 model, fp32 products"][path]),
                   "bf16_products_vs_fp32_model": compare(res["bf16 model, bf16 products"][path],
                                                          res["fp32 model"][path]),
                   "fp32_products_vs_fp32_model": compare(res["bf16 model, fp32 products"][path],
                                                          res["fp32 model"][path])}
            results.append(row)
            print(json.dumps(row), flush=True)
    meta = {"command": "python benchmarks/bench_precision.py " + " ".join(sys.argv[1:]), "model": args.model,
            "device": "cpu", "threads": args.threads, "torch": torch.__version__, "wall_s": round(time.time() - t0)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
