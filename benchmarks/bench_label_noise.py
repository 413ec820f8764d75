"""Which forward signal sees a mislabeled row? Prompt fit and the own-class contrast on real data.

    HF_HUB_OFFLINE=1 python benchmarks/bench_label_noise.py --pool POOL --out DIR
        [--model smollm2] [--label-noise 0.3] [--max-length 256] [--prompt-fit-column template]

POOL: Parquet or JSONL with ``prompt``, ``response``, ``task``, ``template`` (e.g. the pool benchmarks/selection_data.py
builds from P3 and GSM8K). A seeded fraction of the rows gets the response of another row of the same task+template
(bench_selection.add_label_noise, seed 1234: the same rows as the selection benchmark's). Per task, the AUC of:

- prompt fit (``forvalue_ray.prompt_fit``, the product's ``value --prompt-fit-column``): low = mislabeled;
- the own-class contrast (classification templates only: ≤ 20 distinct responses, each shared by ≥ 2 rows on
  average): each task's rows valued against the groups of its own rows by response (``group_scores``, cosine), a
  row's score for its own response's group (itself left out) minus its mean over the template's other responses.

Outputs: DIR/results.json (config; per task: rows, noisy share, kind, AUCs, the share of noisy and clean rows with
prompt fit ≤ 0; overall figures) and DIR/report.md (table).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

import bench_selection as bs
import sft


def auc(noisy: np.ndarray, suspicion: np.ndarray) -> float | None:
    ok = np.isfinite(suspicion)
    y = noisy[ok]
    return float(roc_auc_score(y, suspicion[ok])) if y.any() and (~y).any() else None


def classification_tasks(pool: list[dict]) -> set[str]:
    """Tasks whose templates have few distinct responses, each shared by at least two rows on average."""
    by_template = collections.defaultdict(list)
    for r in pool:
        by_template[(r["task"], r["template"])].append(r["response"])
    return {task for (task, _), resp in by_template.items()
            if 2 <= len(set(resp)) <= bs.MAX_CLASSES and 2 * len(set(resp)) <= len(resp)}


def own_class_contrast(vm, rows: list[dict], max_length: int) -> np.ndarray:
    """Cosine to the group of the row's own response (leave-one-out) minus the mean over its template's other
    responses' groups; NaN where a row's response is its own only or its template has no other response."""
    import forvalue_ray as fv

    groups = [r["response"] for r in rows]
    names, scores = fv.group_scores(vm, rows, rows, groups, normalize=True, max_length=max_length)
    col = {n: j for j, n in enumerate(names)}
    size = collections.Counter(groups)
    template_responses = collections.defaultdict(set)
    for r in rows:
        template_responses[r["template"]].add(r["response"])
    out = np.full(len(rows), np.nan)
    for i, r in enumerate(rows):
        n_own, others = size[r["response"]], template_responses[r["template"]] - {r["response"]}
        if n_own > 1 and others:
            # a group's cosine statistic is the mean of unit-normalized gradients: drop the row's own (cosine 1)
            own = (scores[i, col[r["response"]]] * n_own - 1.0) / (n_own - 1)
            out[i] = own - np.mean([scores[i, col[o]] for o in others])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--label-noise", type=float, default=0.3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--prompt-fit-column", default="template")
    args = p.parse_args(argv)

    import torch

    import forvalue_ray as fv
    from forvalue_ray.model import load_model, resolve_model

    path, provenance = resolve_model(args.model)
    vm = load_model(path, device="cuda" if torch.cuda.is_available() else "cpu")
    pool_all = bs.read_rows(args.pool)
    noisy_ids = set(bs.add_label_noise(pool_all, args.label_noise, seed=1234))
    _, keep = sft.encode(vm.tokenizer, pool_all, args.max_length)
    pool = [pool_all[i] for i in keep]
    noisy = np.array([r["id"] in noisy_ids for r in pool])
    tasks = np.array([str(r["task"]) for r in pool])
    print(f"[noise] {len(pool)} rows, {noisy.mean():.3f} mislabeled, dtype {vm.dtype}", flush=True)

    t0 = time.time()
    fit = fv.prompt_fit(vm, pool, [r[args.prompt_fit_column] for r in pool], max_length=args.max_length)
    fit_s = time.time() - t0
    print(f"[noise] prompt fit: {fit_s:.0f} s, {np.isfinite(fit).sum()} rows with a partner", flush=True)
    contrast = np.full(len(pool), np.nan)
    t0 = time.time()
    classification = classification_tasks(pool)
    for task in sorted(classification):
        idx = np.nonzero(tasks == task)[0]
        contrast[idx] = own_class_contrast(vm, [pool[i] for i in idx], args.max_length)
        print(f"[noise] own-class contrast {task}: AUC {auc(noisy[idx], -contrast[idx])}", flush=True)
    contrast_s = time.time() - t0

    per_task = {}
    for task in sorted(set(tasks)):
        m = tasks == task
        have = m & np.isfinite(fit)
        per_task[task] = {
            "rows": int(m.sum()), "noisy_share": float(noisy[m].mean()),
            "kind": "classification" if task in classification else "generation/QA",
            "auc_prompt_fit": auc(noisy[m], -fit[m]),
            "auc_own_class": auc(noisy[m], -contrast[m]) if task in classification else None,
            "noisy_flagged": float((fit[have & noisy] <= 0).mean()) if (have & noisy).any() else None,
            "clean_flagged": float((fit[have & ~noisy] <= 0).mean()) if (have & ~noisy).any() else None}
    cls = np.isin(tasks, sorted(classification))
    flagged = np.isfinite(fit) & (fit <= 0)
    overall = {
        "auc_prompt_fit": auc(noisy, -fit),
        "auc_prompt_fit_generation_qa": auc(noisy[~cls], -fit[~cls]),
        "auc_prompt_fit_classification": auc(noisy[cls], -fit[cls]),
        "auc_own_class_classification": auc(noisy[cls], -contrast[cls]),
        "flagged_of_noisy": float(flagged[noisy].mean()), "flagged_of_clean": float(flagged[~noisy].mean()),
        "noisy_share_before": float(noisy.mean()), "noisy_share_after_dropping_flagged": float(noisy[~flagged].mean()),
        "prompt_fit_s": fit_s, "own_class_s": contrast_s}
    config = {"pool": args.pool, "model": args.model, "dtype": str(vm.dtype).replace("torch.", ""),
              "device": str(vm.device), "label_noise": args.label_noise, "noise_seed": 1234,
              "max_length": args.max_length, "prompt_fit_column": args.prompt_fit_column, "rows": len(pool),
              "noisy_rows": int(noisy.sum()), "data_digest": bs.file_digest([args.pool])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": config, "overall": overall, "tasks": per_task}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report_md(results))
    print((out / "report.md").read_text())


def report_md(results: dict) -> str:
    c, o = results["config"], results["overall"]

    def f(x):
        return "–" if x is None else f"{x:.3f}"

    lines = [f"# Which forward signal sees a mislabeled row? ({c['model']}, {c['dtype']})", "",
             f"{c['rows']} rows, {c['noisy_rows']} mislabeled (label noise {c['label_noise']}, responses swapped "
             f"within task+template); prompt fit partners by `{c['prompt_fit_column']}`.", "",
             f"Overall AUC (mislabeled rows ranked lowest): prompt fit {f(o['auc_prompt_fit'])} (generation/QA "
             f"{f(o['auc_prompt_fit_generation_qa'])}, classification {f(o['auc_prompt_fit_classification'])}); "
             f"own-class contrast on classification {f(o['auc_own_class_classification'])}. Prompt fit ≤ 0 flags "
             f"{o['flagged_of_noisy']:.1%} of the mislabeled rows and {o['flagged_of_clean']:.1%} of the clean ones "
             f"(mislabeled share {o['noisy_share_before']:.3f} → {o['noisy_share_after_dropping_flagged']:.3f}). "
             f"Time: prompt fit {o['prompt_fit_s']:.0f} s, own-class contrast {o['own_class_s']:.0f} s.", "",
             "| task | kind | rows | mislabeled | AUC prompt fit | AUC own-class | flagged: mislabeled | flagged: clean |",
             "|---|---|---|---|---|---|---|---|"]
    for task, t in sorted(results["tasks"].items(), key=lambda kv: (kv[1]["kind"], -(kv[1]["auc_prompt_fit"] or 0))):
        lines.append(f"| {task} | {t['kind']} | {t['rows']} | {t['noisy_share']:.2f} | {f(t['auc_prompt_fit'])} | "
                     f"{f(t['auc_own_class'])} | {f(t['noisy_flagged'])} | {f(t['clean_flagged'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
