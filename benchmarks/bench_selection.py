"""Does it make a better model? Value → select → fine-tune → measure, against the baselines.

    HF_HUB_OFFLINE=1 python benchmarks/bench_selection.py --pool POOL --target TARGET --test TEST --out DIR
        [--model smollm2] [--fraction 0.05] [--seeds 3] [--methods m1,m2,...] [--label-noise 0.3]
        [--max-length 256] [--train-steps N]

POOL, TARGET, TEST: Parquet or JSONL with ``prompt`` and ``response`` (optional ``id``, ``task``, ``template``).
Every method selects ``round(fraction × pool)`` rows; each selection fine-tunes the same model with the same recipe
(benchmarks/sft.py) for the same number of steps, once per seed (the seed orders the data; ``random`` also draws
its rows with it); the test rows are scored on their response tokens, and where a template has at most 20 distinct
responses, by ranking them by log-likelihood (accuracy).

Methods (a score per pool row, the top k kept; ties by id):
  zero-shot      no fine-tuning                         random       a seeded uniform sample
  full           the whole pool, the same steps          length       the longest responses
  fv-mean        For-Value against the mean target (the paper's score)
  fv-cosine      ``--normalize``: cosine to the mean target gradient
  fv-center      ``--center N``: value against the targets minus value against a sample of the pool
  fv-max         pairwise cosine, round-robin over the target rows (each target's best row in turn)
  fv-class       classification targets (≤ 20 distinct target responses): cosine to the target group of the row's
                 own response when it has one, else the max over groups (the own-class contrast of the docs)
  fv-fit         fv-max over the rows whose prompt fit is at least ``--min-prompt-fit`` (default 0): ``value
                 --prompt-fit-column template``, ``select --min-prompt-fit 0`` (drops responses their own prompt
                 predicts no better than another prompt of their template: mislabeled rows)
  fv-fit-auto    fv-fit with ``select --min-prompt-fit auto``: per template, at least the spread (root mean square)
                 of its negative prompt fits, where 0 keeps about half of the mislabeled rows
  fv-embed       ``select --by embed``: the embedding cosine the pairwise scores carry (the states that predict the
                 response, mean-pooled; the same forward as fv-max), ranked by its mean over the target rows
  fv-joint       ``select --by value+embed --combine round-robin``: fv-max's cosine plus the embedding cosine, per
                 target row, interleaved
  fv-joint-auto  fv-joint over the rows fv-fit-auto keeps: the recommended recipe for a pool with mislabeled rows
  embed-cosine   the model's final hidden state mean-pooled over the response, cosine to the target mean (RDS-like)
  bm25           BM25 (rank-bm25) of the row text against each target text, mean over targets
  loss-low       lowest base-model NLL per response token;   loss-high: highest
  less           LoRA (every layer) per-sample gradients projected to 8,192 dims, cosine, max over targets
                 (no warmup: fresh adapters; see benchmarks/less.py)

The fv-* methods go through the product: ``forvalue-ray value`` then ``forvalue-ray select`` on a local Ray
(``--engine job``, the default where Ray is installed), or the same library's in-process API with the same ranking
(``--engine api``: a GPU machine without Ray).
Outputs: DIR/results.json (config, recipe, every run, per-method means/stds and paired differences to random),
DIR/report.md (table), DIR/selection.png (methods × metric, every seed shown). Results are rewritten after each run;
``bench_selection.py --replot DIR...`` draws table and plot again from DIR/results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import torch

import sft
from forvalue_ray.job.selection import selected_ids

METHODS = ["zero-shot", "random", "fv-mean", "fv-cosine", "fv-center", "fv-max", "fv-class", "fv-fit", "fv-fit-auto",
           "fv-embed", "fv-joint", "fv-joint-auto", "embed-cosine", "bm25",
           "length", "loss-low", "loss-high", "full", "less"]
MAX_CLASSES = 20  # a template with at most this many distinct responses is a classification template


# ---- data --------------------------------------------------------------------------------------------------------------

def read_rows(path: str) -> list[dict]:
    """Parquet or JSONL rows with prompt/response (and optional id, task, template); ids made up when absent."""
    table = pajson.read_json(path) if path.endswith((".jsonl", ".json")) else pq.read_table(path)
    missing = [c for c in ("prompt", "response") if c not in table.column_names]
    if missing:
        raise SystemExit(f"{path}: missing column(s) {missing}; found {table.column_names}")
    rows = table.select([c for c in ("id", "task", "template", "prompt", "response")
                         if c in table.column_names]).to_pylist()
    stem = Path(path).stem
    for i, r in enumerate(rows):
        r["id"] = str(r["id"]) if r.get("id") is not None else f"{stem}/{i}"
        r.setdefault("task", None)
        r.setdefault("template", None)
    return rows


def add_label_noise(pool: list[dict], p: float, seed: int) -> list[str]:
    """Give a seeded fraction p of the pool the response of another row with the same task+template and a
    different response (a mislabeling); rows with no such partner stay clean. Returns the noisy ids."""
    rng = np.random.default_rng(seed)
    by_key: dict = {}
    for i, r in enumerate(pool):
        by_key.setdefault((r["task"], r["template"]), []).append(i)
    chosen = sorted(rng.choice(len(pool), size=int(round(p * len(pool))), replace=False).tolist())
    originals = [r["response"] for r in pool]
    noisy = []
    for i in chosen:
        partners = [j for j in by_key[(pool[i]["task"], pool[i]["template"])] if originals[j] != originals[i]]
        if partners:
            pool[i]["response"] = originals[partners[int(rng.integers(len(partners)))]]
            noisy.append(pool[i]["id"])
    return noisy


def answer_sets(test: list[dict], others: list[list[dict]]) -> dict:
    """template → sorted distinct responses, for templates with at most MAX_CLASSES of them (seen in the test
    rows and the other files)."""
    seen: dict = {}
    for r in test + [r for rows in others for r in rows]:
        if r["template"] is not None:
            seen.setdefault((r["task"], r["template"]), set()).add(r["response"])
    test_keys = {(r["task"], r["template"]) for r in test}
    return {k: sorted(v) for k, v in seen.items() if k in test_keys and 2 <= len(v) <= MAX_CLASSES}


def write_rows(rows: list[dict], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("id", "task", "template", "prompt", "response")}
                                         for r in rows]), path)
    return str(path)


# ---- ranking -------------------------------------------------------------------------------------------------------------

def choose(ids: list[str], values: np.ndarray, k: int, combine: str | None = None, fit: np.ndarray | None = None,
           min_fit: float | str | None = None, embed: np.ndarray | None = None, by: str = "value",
           fit_keys: dict | None = None) -> list[int]:
    """Indices of the k rows ``select`` keeps for these scores (one per row, or [n, targets] with ``combine``; with
    ``min_fit``, among rows whose prompt fit ``fit`` is at least it (``"auto"``: per ``fit_keys`` key) or NaN;
    ``by`` with the pairwise ``embed``): the product's reference ranking (score descending, ties by id), imported,
    not re-implemented."""
    col = {"scores": pa.array(list(values.astype(np.float64)))} if values.ndim == 2 else {
        "score": pa.array(values.astype(np.float64))}
    if embed is not None:
        col["embed"] = pa.array(list(embed.astype(np.float64)))
    if fit is not None:
        col["prompt_fit"] = pa.array(fit, pa.float64(), mask=np.isnan(fit))
    chosen = selected_ids(pa.table({"id": pa.array(ids, pa.string()), **col}), top_k=k, combine=combine,
                          min_prompt_fit=min_fit, fit_keys=fit_keys, by=by)
    return [i for i, rid in enumerate(ids) if rid in chosen]


def own_group(matrix: np.ndarray, names: list[str], responses: list[str]) -> np.ndarray:
    """A row's score against the target group named by its own response when there is one, else its best group."""
    col = {n: j for j, n in enumerate(names)}
    return np.array([matrix[i, col[r]] if r in col else matrix[i].max() for i, r in enumerate(responses)])


def cosine_to_mean(x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    m = targets.mean(0)
    return (x @ m) / (np.linalg.norm(x, axis=1) * np.linalg.norm(m) + 1e-30)


# ---- For-Value through the product ---------------------------------------------------------------------------------

FV_VALUE_FLAGS = {"fv-mean": [], "fv-cosine": ["--normalize"], "fv-center": ["--center", "{center}"],
                  "fv-max": ["--mode", "pairwise", "--normalize"], "fv-embed": ["--mode", "pairwise", "--normalize"],
                  "fv-joint": ["--mode", "pairwise", "--normalize"],
                  "fv-class": ["--mode", "groups", "--group-column", "response", "--normalize"],
                  "fv-fit": ["--mode", "pairwise", "--normalize", "--prompt-fit-column", "{fit_column}"]}
FIT_METHODS = ("fv-fit", "fv-fit-auto", "fv-joint-auto")  # ranked among the rows whose prompt fit passes
for _m in FIT_METHODS:
    FV_VALUE_FLAGS[_m] = FV_VALUE_FLAGS["fv-fit"]
ROUND_ROBIN = ("fv-max", "fv-joint", *FIT_METHODS)


def fv_job(method: str, pool_file: str, target_file: str, work: Path, args, k: int, pool: list[dict],
           memo: dict) -> list[str]:
    """``forvalue-ray value`` then ``forvalue-ray select`` on a local Ray; the selected ids. Methods with the same
    value flags share one value run (``memo`` holds those this process ran)."""
    flags = [f.format(center=args.center, fit_column=args.prompt_fit_column) for f in FV_VALUE_FLAGS[method]]
    scores, sel = work / ("value" + "_".join(flags).replace("-", "_")) / "scores", work / method / "selected"
    cli = [sys.executable, "-m", "forvalue_ray.cli"]
    if scores not in memo.setdefault("valued", set()):
        run([*cli, "value", "--model", args.model, "--train", pool_file, "--target", target_file, "--out",
             str(scores), "--max-length", str(args.max_length), "--overwrite", *flags])
        memo["valued"].add(scores)
    if method == "fv-class":  # the own-group rule reads the per-group scores
        table = pq.read_table(str(scores / "scores"))
        names = pq.read_table(str(scores / "targets.parquet"))["id"].to_pylist()
        by_id = {r["id"]: r["response"] for r in pool}
        ids = table["id"].to_pylist()
        matrix = np.array(table["scores"].to_pylist())
        value = own_group(matrix, names, [by_id[i] for i in ids])
        return [ids[i] for i in choose(ids, value, k)]
    combine = ["--combine", "round-robin"] if method in ROUND_ROBIN else []
    combine += {"fv-embed": ["--by", "embed"], "fv-joint": ["--by", "value+embed"], "fv-fit-auto":
                ["--min-prompt-fit", "auto"], "fv-fit": ["--min-prompt-fit", str(args.min_prompt_fit)],
                "fv-joint-auto": ["--by", "value+embed", "--min-prompt-fit", "auto"]}.get(method, [])
    run([*cli, "select", "--scores", str(scores), "--out", str(sel), "--top-k", str(k), "--overwrite", *combine])
    return pq.read_table(str(sel / "_selection"))["id"].to_pylist()


def fv_api(method: str, vm, pool: list[dict], target: list[dict], args, memo: dict) -> dict:
    """The same scores from the in-process API (no Ray) and the keywords of :func:`choose` that rank them as
    ``select`` does: how targets combine, (fv-fit) each row's prompt fit (one shard: partners drawn over the whole
    pool, as the job does for a pool within one shard), (fv-embed, fv-joint) the embedding cosines and ``by``.
    ``memo`` keeps the pairwise cosines (and embedding cosines) the pairwise methods share."""
    import forvalue_ray as fv

    kw = dict(max_length=args.max_length)

    def pairwise():
        if "pairwise" not in memo:
            t0 = time.time()
            memo["pairwise"], memo["embed"] = fv.pairwise_scores(vm, pool, target, normalize=True, embed=True, **kw)
            memo["pairwise_s"] = time.time() - t0
        return memo["pairwise"]

    if method == "fv-mean":
        return {"values": fv.value_scores(vm, pool, target, **kw)}
    if method == "fv-cosine":
        return {"values": fv.value_scores(vm, pool, target, normalize=True, **kw)}
    if method == "fv-center":
        rng = np.random.default_rng(0)
        sample = [pool[i] for i in sorted(rng.choice(len(pool), min(args.center, len(pool)), replace=False))]
        return {"values": fv.value_scores(vm, pool, target, center=sample, **kw)}
    if method == "fv-max":
        return {"values": pairwise(), "combine": "round-robin"}
    if method == "fv-class":
        names, matrix = fv.group_scores(vm, pool, target, [r["response"] for r in target], normalize=True, **kw)
        return {"values": own_group(matrix, names, [r["response"] for r in pool])}
    if method in FIT_METHODS:
        keys = [r[args.prompt_fit_column] for r in pool]
        if "fit" not in memo:
            t0 = time.time()
            memo["fit"] = fv.prompt_fit(vm, pool, keys, **kw)
            memo["fit_s"] = time.time() - t0
        values = pairwise()
        joint = {"embed": memo["embed"], "by": "value+embed"} if method == "fv-joint-auto" else {}
        return {"values": values, "combine": "round-robin", "fit": memo["fit"],
                "min_fit": args.min_prompt_fit if method == "fv-fit" else "auto",
                "fit_keys": {r["id"]: k for r, k in zip(pool, keys)}, **joint}
    if method == "fv-embed":
        return {"values": pairwise(), "embed": memo["embed"], "by": "embed"}
    if method == "fv-joint":
        return {"values": pairwise(), "embed": memo["embed"], "by": "value+embed", "combine": "round-robin"}
    raise ValueError(method)


def run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:5])} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


# ---- the benchmark -------------------------------------------------------------------------------------------------------

def bm25_scores(pool: list[dict], target: list[dict]) -> np.ndarray:
    from rank_bm25 import BM25Okapi

    def words(r):
        return re.findall(r"\w+", (r["prompt"] + " " + r["response"]).lower())

    bm = BM25Okapi([words(r) for r in pool])
    return np.mean([bm.get_scores(words(t)) for t in target], axis=0)


def summarize(runs: list[dict], random_runs: list[dict] | None) -> dict:
    out: dict = {"runs": runs}
    for key in ("test_loss", "accuracy", "noisy_share", "rows", "tokens", "select_s"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[f"{key}_mean"] = float(np.mean(vals)) if vals else None
        out[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None)
    if random_runs:
        by_seed = {r["seed"]: r for r in random_runs}
        for key in ("test_loss", "accuracy"):
            diffs = [r[key] - by_seed[r["seed"]][key] for r in runs
                     if r["seed"] in by_seed and r.get(key) is not None and by_seed[r["seed"]].get(key) is not None]
            out[f"{key}_diff_random_mean"] = float(np.mean(diffs)) if diffs else None
            out[f"{key}_diff_random_std"] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
    return out


def write_outputs(out: Path, config: dict, runs: dict) -> dict:
    methods = {m: summarize(r, runs.get("random")) for m, r in runs.items()}
    results = {"config": config, "methods": methods}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    (out / "report.md").write_text(report_md(results))
    return results


def fmt(mean, std, digits=3):
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def report_md(results: dict) -> str:
    c = results["config"]
    lines = [f"# Selection benchmark: {c['target_name']}", "",
             f"pool {c['pool_rows']} rows ({c['pool_dropped']} over {c['max_length']} tokens dropped), label noise "
             f"{c['label_noise']}, budget {c['k']} rows ({c['fraction']:.0%}), {c['train_steps']} steps × batch "
             f"{c['batch_size']}, lr {c['lr']}, seeds {c['seeds']}, model {c['model']} on {c['device']}", "",
             "| method | test loss | Δ loss vs random | accuracy | Δ acc vs random | noisy share | rows | tokens | "
             "select s |", "|---|---|---|---|---|---|---|---|---|"]
    for m, s in results["methods"].items():
        lines.append(f"| {m} | {fmt(s['test_loss_mean'], s['test_loss_std'])} | "
                     f"{fmt(s.get('test_loss_diff_random_mean'), s.get('test_loss_diff_random_std'))} | "
                     f"{fmt(s['accuracy_mean'], s['accuracy_std'])} | "
                     f"{fmt(s.get('accuracy_diff_random_mean'), s.get('accuracy_diff_random_std'))} | "
                     f"{fmt(s['noisy_share_mean'], None, 3)} | {fmt(s['rows_mean'], None, 0)} | "
                     f"{fmt(s['tokens_mean'], None, 0)} | {fmt(s['select_s_mean'], None, 1)} |")
    return "\n".join(lines) + "\n"


def plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("test_loss", "accuracy", "noisy_share")
            if any(s[f"{k}_mean"] is not None for s in results["methods"].values())]
    if not keys:  # selection only, without label noise: nothing to plot
        return
    names = list(results["methods"])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 0.35 * len(names) + 1.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for y, m in enumerate(names):
            vals = [r[key] for r in results["methods"][m]["runs"] if r.get(key) is not None]
            if vals:
                ax.scatter(vals, [y] * len(vals), s=14, alpha=0.7, color="C0" if m.startswith("fv") else "C7")
                ax.plot([np.mean(vals)] * 2, [y - 0.3, y + 0.3], color="k", lw=1.5)
        rnd = results["methods"].get("random", {}).get(f"{key}_mean")
        if rnd is not None:
            ax.axvline(rnd, color="C3", lw=0.8, ls="--")
        ax.set_yticks(range(len(names)), names if ax is axes[0][0] else [""] * len(names))
        ax.invert_yaxis()
        ax.set_title(key.replace("_", " ") + (" (lower is better)" if key != "accuracy" else ""))
    fig.suptitle(f"{results['config']['target_name']}: fine-tuned on each selection (dots: seeds; red: random)")
    fig.tight_layout()
    fig.savefig(out / "selection.png", dpi=110)
    plt.close(fig)


def file_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--replot"]:  # table and plot again from DIR/results.json
        for d in sys.argv[2:]:
            results = json.loads((Path(d) / "results.json").read_text())
            (Path(d) / "report.md").write_text(report_md(results))
            plot(Path(d), results)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2", help="smollm2 (the embedded default), a .gguf, or a HF directory")
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--label-noise", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-steps", type=int, help="optimizer steps for every method (default: 3 epochs of the budget)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--test-limit", type=int, default=300, help="at most this many test rows (a seeded sample)")
    p.add_argument("--center", type=int, default=1000, help="fv-center: pool rows in the centering sample")
    p.add_argument("--engine", choices=["auto", "job", "api"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for fine-tuning and evaluation (auto: on CUDA)")
    p.add_argument("--less-dim", type=int, default=8192)
    p.add_argument("--prompt-fit-column", default="template", help="fv-fit: rows sharing this column's value lend "
                                                                     "each other prompts")
    p.add_argument("--min-prompt-fit", type=float, default=0.0, help="fv-fit: the prompt fit a row needs "
                   "(fv-fit-auto: per template, see forvalue-ray select --min-prompt-fit auto)")
    p.add_argument("--select-only", action="store_true",
                   help="selection only, no fine-tuning: rows, tokens, noisy share and time per method (a CPU's "
                        "quick look; test loss and accuracy stay null)")
    p.add_argument("--name", help="the target's name in the report (default: the target file's stem)")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forvalue_ray.model import load_model, resolve_model

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {METHODS}")
    if args.engine == "auto":
        try:
            import ray  # noqa: F401
            args.engine = "job"
        except ImportError:
            args.engine = "api"
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    amp = torch.bfloat16 if (args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda")) else None
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"

    path, provenance = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pool_all, target_all, test_all = read_rows(args.pool), read_rows(args.target), read_rows(args.test)
    overlap = {r["id"] for r in pool_all} & ({r["id"] for r in target_all} | {r["id"] for r in test_all})
    if overlap:
        raise SystemExit(f"{len(overlap)} ids of TARGET/TEST are also in POOL (e.g. {sorted(overlap)[:3]}); hold them out")
    noisy_ids = set(add_label_noise(pool_all, args.label_noise, seed=1234)) if args.label_noise else set()
    pool_enc, keep = sft.encode(tok, pool_all, args.max_length)
    pool = [pool_all[i] for i in keep]
    target_enc, keep_t = sft.encode(tok, target_all, args.max_length)
    target = [target_all[i] for i in keep_t]
    rng = np.random.default_rng(0)
    if len(test_all) > args.test_limit:
        test_all = [test_all[i] for i in sorted(rng.choice(len(test_all), args.test_limit, replace=False))]
    test_enc, keep_s = sft.encode(tok, test_all, args.max_length)
    test = [test_all[i] for i in keep_s]
    answers = answer_sets(test, [pool_all, target_all])
    candidates, answer = [], []
    for r in test:
        choices = answers.get((r["task"], r["template"]))
        if choices and r["response"] in choices:
            cand, _ = sft.encode(tok, [{**r, "response": c} for c in choices], 1 << 30)
            candidates.append(cand)
            answer.append(choices.index(r["response"]))
        else:
            candidates.append([])
            answer.append(None)
    k = max(1, int(round(args.fraction * len(pool))))
    batch = args.batch_size
    steps = args.train_steps or math.ceil(3 * k / batch)
    pool_ids = [r["id"] for r in pool]
    pool_file = write_rows(pool, work / "pool.parquet")
    target_file = write_rows(target, work / "target.parquet")
    noisy_in_pool = [i for i in pool_ids if i in noisy_ids]

    config = {
        "pool": args.pool, "target": args.target, "test": args.test, "target_name": args.name or Path(args.target).stem,
        "data_digest": file_digest([args.pool, args.target, args.test]),
        "model": args.model, "model_provenance": {k_: v for k_, v in provenance.items() if k_ != "spec"},
        "fraction": args.fraction, "k": k, "seeds": args.seeds, "methods": methods, "label_noise": args.label_noise,
        "noisy_rows": len(noisy_in_pool), "noisy_ids_sha": hashlib.sha256("\n".join(sorted(noisy_in_pool)).encode()
                                                                          ).hexdigest()[:16],
        "max_length": args.max_length, "pool_rows": len(pool), "pool_dropped": len(pool_all) - len(pool),
        "target_rows": len(target), "test_rows": len(test), "test_rows_with_choices": sum(a is not None for a in answer),
        "train_steps": steps, "batch_size": batch, "lr": args.lr, "engine": args.engine, "center": args.center,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "bf16": amp is not None,
        "torch": torch.__version__, "select_only": args.select_only,
        "prompt_fit": {"column": args.prompt_fit_column, "min": args.min_prompt_fit,
                       "auto": [m for m in FIT_METHODS if m != "fv-fit"]},
        "recipe": (f"full fine-tune of {args.model}, loss on response tokens (+EOS) only, AdamW lr {args.lr} linear "
                   f"decay to 0, no warmup, weight decay 0, grad clip 1.0, batch {batch}, {steps} steps for every "
                   f"method (`full`: the same steps drawn from the whole pool), bf16 autocast "
                   f"{'on' if amp is not None else 'off'}; test loss = mean NLL per response token over "
                   f"{len(test)} test rows; accuracy = argmax of summed log-likelihood over the template's distinct "
                   f"responses (≤ {MAX_CLASSES})"),
    }
    (work / "noisy_ids.json").write_text(json.dumps(sorted(noisy_in_pool)))
    print(f"[select] pool {len(pool)} rows, k {k}, {steps} steps × {batch}, test {len(test)} "
          f"({config['test_rows_with_choices']} with choices), engine {args.engine}, device {config['device']}",
          flush=True)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.eval()
    base_state = {n: t.detach().clone() for n, t in model.state_dict().items()}

    # ---- selection: every method's rows, before any fine-tuning ----
    selections: dict[str, dict] = {}
    pool_stats = None

    def pool_statistics():
        nonlocal pool_stats
        if pool_stats is None:
            t0 = time.time()
            pool_stats = sft.response_stats(model, pool_enc, pad_id, amp=amp, hidden=True)
            pool_stats["target_hidden"] = sft.response_stats(model, target_enc, pad_id, amp=amp, hidden=True)["hidden"]
            pool_stats["seconds"] = time.time() - t0
        return pool_stats

    vm, memo = None, {}
    scores: dict[str, np.ndarray] = {}  # every method's per-row scores, saved for later analysis
    for m in methods:
        if m in ("zero-shot", "random", "full"):
            continue
        if m == "fv-class" and not is_classification(target):
            print(f"[select] {m}: skipped, the target has more than {MAX_CLASSES} distinct responses", flush=True)
            continue
        shared = 0.0
        if m in ("embed-cosine", "loss-low", "loss-high", "length"):
            st = pool_statistics()
            shared = st["seconds"]  # the shared forward counts towards each method that uses it
        if m in ("fv-embed", "fv-joint", *FIT_METHODS):
            # the pairwise cosines (and prompt fits) of the method that ran first
            shared = memo.get("pairwise_s", 0.0) + (memo.get("fit_s", 0.0) if m in FIT_METHODS else 0.0)
        t0 = time.time()
        ranking: dict = {}
        if m.startswith("fv-") and args.engine == "job":
            chosen = set(fv_job(m, pool_file, target_file, work, args, k, pool, memo))
            idx = [j for j, i in enumerate(pool_ids) if i in chosen]
        else:
            if m.startswith("fv-"):
                if vm is None:
                    vm = load_model(path, device=str(device))
                    config["value_dtype"] = str(vm.dtype).replace("torch.", "")
                ranking = fv_api(m, vm, pool, target, args, memo)
                value = ranking.pop("values")
            elif m == "bm25":
                value = bm25_scores(pool, target)
            elif m == "less":
                from less import LoraGradients

                lora_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
                grads = LoraGradients(lora_model, dim=args.less_dim)
                g_pool, g_target = grads(pool_enc, pad_id, amp=amp), grads(target_enc, pad_id, amp=amp)
                value = (g_pool @ g_target.T).max(1)
                del lora_model, grads
            else:
                nll = -st["logp"] / np.maximum(st["n_tokens"], 1)
                value = {"embed-cosine": lambda: cosine_to_mean(st["hidden"], st["target_hidden"]),
                         "loss-low": lambda: -nll, "loss-high": lambda: nll,
                         "length": lambda: st["n_tokens"].astype(float)}[m]()
            idx = choose(pool_ids, np.asarray(value), k, **ranking)
            scores[m] = np.asarray(value) if "embed" not in ranking else ranking["embed"] + (
                np.asarray(value) if ranking["by"] == "value+embed" else 0)
        selections[m] = {"idx": sorted(idx), "select_s": time.time() - t0 + shared}
        print(f"[select] {m}: {len(idx)} rows in {selections[m]['select_s']:.1f} s", flush=True)
    if scores:
        pq.write_table(pa.table({"id": pool_ids, "noisy": [i in noisy_ids for i in pool_ids],
                                 **{m: pa.array(list(v) if v.ndim == 2 else v) for m, v in scores.items()}}),
                       work / "scores.parquet")
    if vm is not None:
        del vm
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- fine-tune on each selection, seeds outermost so an interrupted run still has every method ----
    runs: dict[str, list] = {m: [] for m in methods}
    zero = None
    for seed in range(args.seeds):
        for m in methods:
            if m == "zero-shot":
                if args.select_only:
                    continue
                if zero is None:
                    zero = sft.evaluate(model, test_enc, candidates, answer, pad_id, amp=amp)
                runs[m].append({"seed": seed, **zero, "rows": 0, "tokens": 0, "noisy_share": None, "select_s": 0.0})
                continue
            if m == "random":
                idx = sorted(np.random.default_rng(seed).choice(len(pool), k, replace=False).tolist())
                sel_s = 0.0
            elif m == "full":
                idx, sel_s = list(range(len(pool))), 0.0
            elif m in selections:
                idx, sel_s = selections[m]["idx"], selections[m]["select_s"]
            else:
                continue
            rows = [pool_enc[i] for i in idx]
            ids = sorted(pool_ids[i] for i in idx)
            t0 = time.time()
            if args.select_only:
                fit, ev = {}, {"test_loss": None, "accuracy": None}
            else:
                model.load_state_dict(base_state)
                fit = sft.train(model, rows, pad_id, steps=steps, batch_size=batch, lr=args.lr, seed=seed, amp=amp)
                ev = sft.evaluate(model, test_enc, candidates, answer, pad_id, amp=amp)
            runs[m].append({
                "seed": seed, **ev, "rows": len(idx), "tokens": int(sum(len(r.input_ids) for r in rows)),
                "response_tokens": int(sum(r.n_valued for r in rows)),
                "noisy_share": (sum(pool_ids[i] in noisy_ids for i in idx) / len(idx)) if args.label_noise else None,
                "ids_sha": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16], "select_s": sel_s,
                "target_task_share": share_of_task(pool, idx, target), **fit})
            print(f"[train] seed {seed} {m:13s} loss {ev['test_loss']} acc {ev['accuracy']} "
                  f"({time.time() - t0:.1f} s)", flush=True)
            write_outputs(out, config, {mm: r for mm, r in runs.items() if r})
    if device.type == "cuda":
        config["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results = write_outputs(out, config, {mm: r for mm, r in runs.items() if r})
    plot(out, results)
    print((out / "report.md").read_text())


def is_classification(target: list[dict]) -> bool:
    return len({r["response"] for r in target}) <= MAX_CLASSES


def share_of_task(pool: list[dict], idx: list[int], target: list[dict]) -> float | None:
    tasks = {r["task"] for r in target if r["task"] is not None}
    if not tasks:
        return None
    return sum(pool[i]["task"] in tasks for i in idx) / max(1, len(idx))


if __name__ == "__main__":
    main()
