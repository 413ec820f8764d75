"""Quality / cost benchmark of For-Value on the DataInf-style tasks (the DataInf paper's protocol), CPU, one file.

One forward per row, reused by every method: a bench-local loop over engine.valued_tokens and one
readout.vocab_pass carrying several accumulators (exact pairwise TokenKernel, CountSketches of α for
TensorSketches), then a second vocabulary pass with the final lse (readout.error_chunk) for what needs
α itself: ‖G‖² (cosine), the Kronecker sketch P α_t, and per-token top-k ids (topk_unique).

    HF_HUB_OFFLINE=1 python benchmarks/bench_quality.py --n-train-per-class 20 --n-val-per-class 3
    python benchmarks/bench_quality.py --report        # markdown tables + plots from results/*.json

Defaults are the full DataInf protocol (90/10 per class), which takes hours on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS, PLOTS = HERE / "results", HERE / "plots"

p = argparse.ArgumentParser()
p.add_argument("--tasks", default="sentence,math,math_reason")
p.add_argument("--noisy-tasks", default="sentence,math")
p.add_argument("--noise", type=float, default=0.2)
p.add_argument("--seed", type=int, default=0, help="data seed")
p.add_argument("--n-classes", type=int, default=10)
p.add_argument("--n-train-per-class", type=int, default=90)
p.add_argument("--n-val-per-class", type=int, default=10)
p.add_argument("--sketch-dims", default="1024,4096,16384")
p.add_argument("--sketch-seeds", default="0,1")
p.add_argument("--kron-dim", type=int, default=64)
p.add_argument("--topk", default="5,32")
p.add_argument("--topk-batch", type=int, default=8, help="rows per 'batch' for topk_unique")
p.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per forward")
p.add_argument("--vocab-chunk", type=int, default=8192)
p.add_argument("--hf-task", default="sentence")
p.add_argument("--hf-train-per-class", type=int, default=4)
p.add_argument("--hf-val-per-class", type=int, default=1)
p.add_argument("--hf-dim", type=int, default=8192)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--report", action="store_true", help="only write tables/plots from existing results")
args = p.parse_args()


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- metrics
def class_metrics(scores, tr_cls, va_cls, k):
    """Per validation row: AUC over train rows vs same-class, recall@k. Returns mean/std dicts."""
    from sklearn.metrics import roc_auc_score
    aucs, recs = [], []
    for j, c in enumerate(va_cls):
        lab = (tr_cls == c).astype(int)
        s = scores[:, j]
        aucs.append(roc_auc_score(lab, s))
        top = np.argsort(-s, kind="stable")[:k]
        recs.append(lab[top].mean())
    return {"auc": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
            "recall": float(np.mean(recs)), "recall_std": float(np.std(recs))}


def agreement(approx, exact, ks):
    from scipy.stats import spearmanr
    rho = [spearmanr(approx[:, j], exact[:, j])[0] for j in range(exact.shape[1])]
    out = {"spearman": float(np.mean(rho)), "spearman_min": float(np.min(rho))}
    for k in ks:
        ov = [len(set(np.argsort(-approx[:, j])[:k]) & set(np.argsort(-exact[:, j])[:k])) / k
              for j in range(exact.shape[1])]
        out[f"top{k}_overlap"] = float(np.mean(ov))
    return out


def noisy_metrics(value, corrupted):
    from sklearn.metrics import roc_auc_score
    order = np.argsort(-value, kind="stable")
    n = len(value)
    return {"auc": float(roc_auc_score(corrupted.astype(int), -value)),
            "clean_top10": float(1 - corrupted[order[:max(1, round(0.1 * n))]].mean()),
            "clean_top20": float(1 - corrupted[order[:max(1, round(0.2 * n))]].mean()),
            "base_clean": float(1 - corrupted.mean())}


# ---------------------------------------------------------------- the shared loop
class Timer:
    def __init__(self):
        self.t = defaultdict(float)

    def wrap(self, key, fn):
        def f(*a, **kw):
            t0 = time.perf_counter()
            r = fn(*a, **kw)
            self.t[key] += time.perf_counter() - t0
            return r
        return f

    def add(self, key, t0):
        self.t[key] += time.perf_counter() - t0


def gaussian_chunk(seed, v0, v1, rows, dev):
    """Columns v0:v1 of a [rows, V] N(0, 1/rows) matrix, regenerated chunkwise from (seed, v0)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + v0)
    return (torch.randn(rows, v1 - v0, generator=g) / rows ** 0.5).to(dev)


def run_rows(vm, rows, cfg, timer, ref=None, ref_alpha=None):
    """Every per-row quantity of every method from ONE forward per row.

    Returns per-row arrays (input order) plus the stash of valued tokens for the vocabulary-subset methods."""
    from forvalue_ray import engine, readout, sketch
    head, V, d = vm.head, vm.head.vocab_size, vm.head.weight.shape[1]
    n = len(rows)
    acc = torch.float32
    out = defaultdict(dict)
    stash = {"h": [], "y": [], "lse": [], "row": [], "top": []}
    hashes = {(D, s): sketch.SketchHashes.make(D, s, V, d) for D in cfg["sketch_dims"] for s in cfg["sketch_seeds"]}
    kmax = max(cfg["topk"]) if cfg["topk"] else 0
    for idx in engine.plan_batches([len(r.input_ids) for r in rows], args.max_tokens):
        t0 = time.perf_counter()
        vt = engine.valued_tokens(vm, [rows[i] for i in idx])
        timer.add("forward", t0)
        N = len(vt.y)
        accs, names = [], []
        if ref is not None:
            k = readout.TokenKernel(head, ref.tokens, N, acc)
            k.chunk = timer.wrap("exact_pairwise", lambda h, v0, v1, e, k=k: k.total.add_(e @ ref_alpha[v0].T))
            accs.append(k), names.append("exact")
        for (D, s), hs in hashes.items():
            a = readout.CountSketchOfError(hs.vocab_buckets, hs.vocab_signs, D, N, acc)
            a.chunk = timer.wrap(f"tensorsketch_{D}", a.chunk)
            a.rescale = timer.wrap(f"tensorsketch_{D}", a.rescale)
            accs.append(a), names.append((D, s))
        t0 = time.perf_counter()
        res = readout.vocab_pass(head, vt.h, vt.y, accs, args.vocab_chunk)
        timer.add("pass1_total", t0)
        seg = vt.seg
        hacc = vt.h.to(acc)
        for name, val in zip(names, res.values):
            t0 = time.perf_counter()
            if name == "exact":
                kern = val * (hacc @ ref.tokens.h.to(acc).T)
                pp = readout.segment_sum(readout.segment_sum(kern, seg, len(idx), 0), ref.tokens.seg, len(ref.ids), 1)
                for i, r in zip(idx, pp):
                    out["exact"][i] = r.double().numpy()
                timer.add("exact_pairwise", t0)
            else:
                D, s = name
                ts = sketch.spectrum_to_sketch(sketch.sketch_spectrum(val, vt.h, hashes[name], seg, len(idx)), hashes[name])
                for i, r in zip(idx, ts):
                    out[f"ts_{D}_s{s}"][i] = r.double().numpy()
                timer.add(f"tensorsketch_{D}", t0)
        # second pass with the final lse: α exactly, chunk by chunk
        t0 = time.perf_counter()
        members = [(seg == j).nonzero().squeeze(1) for j in range(len(idx))]
        gram = [torch.zeros(len(m), len(m), dtype=acc) for m in members]
        pa = {s: torch.zeros(N, args.kron_dim, dtype=acc) for s in cfg["kron_seeds"]}
        topv = torch.full((N, kmax), -1.0) if kmax else None
        topi = torch.zeros((N, kmax), dtype=torch.long) if kmax else None
        for v0 in range(0, V, args.vocab_chunk):
            v1 = min(v0 + args.vocab_chunk, V)
            t1 = time.perf_counter()
            a = readout.error_chunk(head, vt.h, vt.y, res.lse, v0, v1, acc)
            timer.add("alpha_pass_shared", t1)
            t1 = time.perf_counter()
            for g, m in zip(gram, members):
                g += a[m] @ a[m].T
            timer.add("cosine_norms", t1)
            t1 = time.perf_counter()
            for s in pa:
                pa[s] += a @ gaussian_chunk(1000 + s, v0, v1, args.kron_dim, a.device).T
            timer.add("kronecker", t1)
            if kmax:
                t1 = time.perf_counter()
                prob = -a  # p = e_y − α (plain head, f' = 1)
                hit = ((vt.y >= v0) & (vt.y < v1)).nonzero().squeeze(1)
                prob[hit, vt.y[hit] - v0] += 1.0
                cv, ci = prob.topk(min(kmax, v1 - v0), dim=1)
                allv, alli = torch.cat([topv, cv], 1), torch.cat([topi, ci + v0], 1)
                topv, sel = allv.topk(kmax, dim=1)
                topi = alli.gather(1, sel)
                timer.add("topk_ids", t1)
        t1 = time.perf_counter()
        for j, (i, g, m) in enumerate(zip(idx, gram, members)):
            hs = hacc[m]
            out["sqnorm"][i] = float((g * (hs @ hs.T)).sum())
            out["emb"][i] = hs.sum(0).double().numpy()
        for s in pa:
            q = torch.randn(d, args.kron_dim, generator=torch.Generator().manual_seed(2000 + s)) / args.kron_dim ** 0.5
            qh = hacc @ q  # (Q h_t) with Q [kron_dim, d] ~ N(0, 1/kron_dim)
            kr = torch.einsum("na,nb->nab", pa[s], qh).reshape(N, -1)
            ks = readout.segment_sum(kr, seg, len(idx))
            for i, r in zip(idx, ks):
                out[f"kron_s{s}"][i] = r.double().numpy()
        timer.add("kronecker", t1)
        if cfg.get("check_sqnorm"):  # once: the fused Gram equals readout.gradient_sq_norms
            ref_sq = readout.gradient_sq_norms(head, vt.h, vt.y, res.lse, seg, len(idx), args.vocab_chunk)
            mine = torch.tensor([out["sqnorm"][i] for i in idx], dtype=torch.float64)
            assert torch.allclose(mine, ref_sq.double(), rtol=1e-5), (mine, ref_sq)
            cfg["check_sqnorm"] = False
        timer.add("pass2_total", t0)
        stash["h"].append(vt.h), stash["y"].append(vt.y), stash["lse"].append(res.lse)
        stash["row"].append(torch.as_tensor(idx)[seg])
        if kmax:
            stash["top"].append(topi)
    perm = {k: np.stack([v[i] for i in range(n)]) if isinstance(v[0], np.ndarray) else np.array([v[i] for i in range(n)])
            for k, v in out.items()}
    st = {k: torch.cat(v) for k, v in stash.items() if v}
    return perm, st


def subset_alpha(vm, st, ids):
    """α[:, ids] = [y = v] − p_v with p the FULL softmax (lse from the full pass)."""
    z, fp = vm.head.logits_columns(st["h"], ids, torch.float32)
    return (st["y"][:, None] == ids[None, :]).float() - torch.exp(z - st["lse"][:, None])


def subset_scores(vm, st_tr, st_va, n_tr, n_va, ids, mask_tr=None, mask_va=None):
    """Σ_{t,s} (α_t[V̂]·α'_s[V̂])(h_t·h'_s): inner product of |V̂|×d gradients restricted to V̂."""
    from forvalue_ray.readout import segment_sum
    a_tr, a_va = subset_alpha(vm, st_tr, ids), subset_alpha(vm, st_va, ids)
    if mask_tr is not None:
        a_tr, a_va = a_tr * mask_tr, a_va * mask_va
    k = (a_tr @ a_va.T) * (st_tr["h"].float() @ st_va["h"].float().T)
    return segment_sum(segment_sum(k, st_tr["row"], n_tr, 0), st_va["row"], n_va, 1).double().numpy()


def topk_masks(st, n_rows, k, group_of_row):
    """Per token: membership of the union of top-k ids over its row's batch (groups of rows)."""
    tok_group = group_of_row[st["row"]]
    sets = {}
    for g in tok_group.unique().tolist():
        sets[g] = st["top"][tok_group == g][:, :k].unique()
    return tok_group, sets


def topk_unique_scores(vm, st_tr, st_va, n_tr, n_va, k, g_tr, g_va):
    gt, sets_tr = topk_masks(st_tr, n_tr, k, g_tr)
    gv, sets_va = topk_masks(st_va, n_va, k, g_va)
    U = torch.cat(list(sets_tr.values()) + list(sets_va.values())).unique()
    pos = {int(v): i for i, v in enumerate(U.tolist())}

    def mask(tok_group, sets):
        m = torch.zeros(len(tok_group), len(U))
        for g, s in sets.items():
            cols = torch.tensor([pos[int(v)] for v in s.tolist()])
            rows_ = (tok_group == g).nonzero().squeeze(1)
            m[rows_[:, None], cols[None, :]] = 1.0
        return m
    sizes = [len(s) for s in list(sets_tr.values()) + list(sets_va.values())]
    return subset_scores(vm, st_tr, st_va, n_tr, n_va, U, mask(gt, sets_tr), mask(gv, sets_va)), float(np.mean(sizes))


def seeded_groups(n, size, seed):
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    g = torch.zeros(n, dtype=torch.long)
    for pos_, i in enumerate(perm):
        g[i] = pos_ // size
    return g


# ---------------------------------------------------------------- one task
def run_task(vm, task, noise, cache=None):
    import tasks
    from forvalue_ray import api
    from forvalue_ray.engine import Reference
    from forvalue_ray.readout import ReferenceTokens, error_chunk
    full = noise == 0
    tr, va = tasks.make_task(task, seed=args.seed, n_classes=args.n_classes, n_train_per_class=args.n_train_per_class,
                             n_val_per_class=args.n_val_per_class, noise=noise)
    enc_tr = api.encode_rows(vm, [{"text": r["text"]} for r in tr])
    enc_va = api.encode_rows(vm, [{"text": r["text"]} for r in va])
    tr_cls = np.array([r["class"] for r in tr]); va_cls = np.array([r["class"] for r in va])
    corrupted = np.array([r["corrupted"] for r in tr])
    cfg = dict(sketch_dims=[int(x) for x in args.sketch_dims.split(",")] if full else [4096],
               sketch_seeds=[int(x) for x in args.sketch_seeds.split(",")],
               kron_seeds=[0, 1] if full else [], topk=[int(x) for x in args.topk.split(",")] if full else [],
               check_sqnorm=full)
    timer = Timer()
    T0 = time.perf_counter()
    # validation rows: same loop (no reference) → their tokens become the pairwise reference
    if cache is not None:
        va_out, st_va, ref, ref_alpha = cache["va"]
    else:
        va_out, st_va = run_rows(vm, enc_va, cfg, timer)
        ref = Reference(ReferenceTokens(st_va["h"], st_va["y"], st_va["lse"], st_va["row"]),
                        [r.id for r in enc_va], torch.as_tensor(va_out["sqnorm"]))
        t0 = time.perf_counter()
        ref_alpha = {v0: error_chunk(vm.head, st_va["h"], st_va["y"], st_va["lse"], v0,
                                     min(v0 + args.vocab_chunk, vm.head.vocab_size), torch.float32)
                     for v0 in range(0, vm.head.vocab_size, args.vocab_chunk)}
        timer.add("exact_pairwise", t0)
    timer_val = dict(timer.t)
    timer = Timer()
    if cache is not None:  # noisy run: the clean rows are the clean run's rows (tasks.py), reuse their results
        todo = [i for i, r in enumerate(tr) if r["text"] not in cache["tr"]]
        sub, _ = run_rows(vm, [enc_tr[i] for i in todo], cfg, timer, ref, ref_alpha)
        tr_out = {}
        for k in sub:
            tr_out[k] = np.stack([sub[k][todo.index(i)] if i in todo else cache["tr"][r["text"]][k]
                                  for i, r in enumerate(tr)])
        n_forwarded = len(todo)
    else:
        tr_out, st_tr = run_rows(vm, enc_tr, cfg, timer, ref, ref_alpha)
        n_forwarded = len(tr)
    wall = time.perf_counter() - T0
    k = args.n_train_per_class
    S = {"exact": tr_out["exact"]}
    inv_tr, inv_va = 1 / np.sqrt(tr_out["sqnorm"]), 1 / np.sqrt(va_out["sqnorm"])
    S["cosine"] = S["exact"] * inv_tr[:, None] * inv_va[None, :]
    S["emb"] = tr_out["emb"] @ va_out["emb"].T
    en_tr, en_va = np.linalg.norm(tr_out["emb"], axis=1), np.linalg.norm(va_out["emb"], axis=1)
    S["emb_cosine"] = S["emb"] / en_tr[:, None] / en_va[None, :]
    for D in cfg["sketch_dims"]:
        for s in cfg["sketch_seeds"]:
            S[f"tensorsketch_{D}_s{s}"] = tr_out[f"ts_{D}_s{s}"] @ va_out[f"ts_{D}_s{s}"].T
    for s in cfg["kron_seeds"]:
        S[f"kronecker_{args.kron_dim}x{args.kron_dim}_s{s}"] = tr_out[f"kron_s{s}"] @ va_out[f"kron_s{s}"].T
    extra = {}
    if full:
        t0 = time.perf_counter()
        ids = torch.cat([torch.as_tensor(e.labels[1:]) for e in enc_tr + enc_va]).unique()
        S["total_unique"] = subset_scores(vm, st_tr, st_va, len(tr), len(va), ids)
        extra["total_unique_size"] = len(ids)
        timer.add("total_unique", t0)
        g_tr = seeded_groups(len(tr), args.topk_batch, 100 + args.seed)
        g_va = seeded_groups(len(va), args.topk_batch, 200 + args.seed)
        for kk in cfg["topk"]:
            t0 = time.perf_counter()
            S[f"topk_unique_{kk}"], extra[f"topk_unique_{kk}_mean_batch_size"] = topk_unique_scores(
                vm, st_tr, st_va, len(tr), len(va), kk, g_tr, g_va)
            timer.add(f"topk_unique_{kk}", t0)
    out = {"task": task, "noise": noise, "n_train": len(tr), "n_val": len(va), "k_recall": k,
           "train_tokens": int(sum(e.n_valued for e in enc_tr)), "val_tokens": int(sum(e.n_valued for e in enc_va)),
           "n_forwarded_train": n_forwarded, "wall_s": wall, "time_train_s": dict(timer.t), "time_val_s": timer_val,
           "peak_rss_mib": rss_mib(), **extra}
    t = timer.t
    out["time_train_s"]["pass1_base"] = t["pass1_total"] - sum(v for kk, v in t.items()
                                                               if kk.startswith(("tensorsketch", "exact")))
    out["forward_tokens_per_s"] = out["train_tokens"] * n_forwarded / len(tr) / max(t["forward"], 1e-9)
    if full:
        out["metrics"] = {m: class_metrics(s, tr_cls, va_cls, k) for m, s in S.items()}
        out["agreement_with_exact"] = {m: agreement(s, S["exact"], [k, 90])
                                       for m, s in S.items() if m != "exact"}
    else:
        out["noisy"] = {m: noisy_metrics(S[m].mean(1), corrupted)
                        for m in ["exact", "cosine", "emb", "emb_cosine"] + [x for x in S if x.startswith("tensorsketch")]}
        out["values"] = {m: S[m].mean(1).tolist() for m in ["exact", "cosine", "emb", "tensorsketch_4096_s0"]}
        out["corrupted"] = corrupted.astype(int).tolist()
    cache_out = None
    if full:
        cache_out = {"va": (va_out, st_va, ref, ref_alpha),
                     "tr": {r["text"]: {kk: tr_out[kk][i] for kk in tr_out} for i, r in enumerate(tr)}}
    return out, S, cache_out, (tr, va, enc_tr, enc_va)


# ---------------------------------------------------------------- Hessian-free (TracIn, one checkpoint)
def run_hessian_free(vm, task, S_exact, data):
    """Full all-layer per-sample gradients of the summed log-likelihood (autograd, batch 1, fp32), CountSketched
    to args.hf_dim with seeded per-parameter bucket/sign hashes; scores = sketch inner products."""
    tr, va, enc_tr, enc_va = data
    tr_cls = np.array([r["class"] for r in tr]); va_cls = np.array([r["class"] for r in va])
    pick_tr = [i for c in range(args.n_classes) for i in np.flatnonzero(tr_cls == c)[:args.hf_train_per_class]]
    pick_va = [i for c in range(args.n_classes) for i in np.flatnonzero(va_cls == c)[:args.hf_val_per_class]]
    params = [q for q in vm.model.parameters() if q.requires_grad or True]
    g = torch.Generator().manual_seed(12345)
    t0 = time.perf_counter()
    hashes = [(torch.randint(0, args.hf_dim, (q.numel(),), generator=g),
               torch.randint(0, 2, (q.numel(),), generator=g).float() * 2 - 1) for q in params]
    t_hash = time.perf_counter() - t0
    for q in params:
        q.requires_grad_(True)

    def grad_sketch(e):
        ids = torch.as_tensor(np.array(e.input_ids))[None]
        lab = torch.as_tensor(np.array(e.labels))[None]
        vm.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = vm.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            tgt = lab[:, 1:]
            m = tgt != -100
            ll = torch.log_softmax(logits, -1)[m].gather(1, tgt[m][:, None]).sum()
            ll.backward()
        t1 = time.perf_counter()
        out = torch.zeros(args.hf_dim)
        for q, (b, s) in zip(params, hashes):
            if q.grad is not None:
                out.index_add_(0, b, q.grad.reshape(-1) * s)
        return out, time.perf_counter() - t1
    t_grad, t_proj = 0.0, 0.0
    sk = {}
    for i in pick_tr + [("v", j) for j in pick_va]:
        e = enc_va[i[1]] if isinstance(i, tuple) else enc_tr[i]
        t0 = time.perf_counter()
        s, tp = grad_sketch(e)
        t_grad += time.perf_counter() - t0 - tp
        t_proj += tp
        sk[i] = s.double().numpy()
    vm.model.zero_grad(set_to_none=True)
    A = np.stack([sk[i] for i in pick_tr]); B = np.stack([sk[("v", j)] for j in pick_va])
    hf = A @ B.T
    hf_cos = hf / np.linalg.norm(A, axis=1)[:, None] / np.linalg.norm(B, axis=1)[None, :]
    fv = S_exact["exact"][np.ix_(pick_tr, pick_va)]
    fvc = S_exact["cosine"][np.ix_(pick_tr, pick_va)]
    k = args.hf_train_per_class
    n = len(pick_tr) + len(pick_va)
    return {"task": task, "n_train": len(pick_tr), "n_val": len(pick_va), "projection": f"CountSketch to {args.hf_dim}",
            "metrics": {"hessian_free": class_metrics(hf, tr_cls[pick_tr], va_cls[pick_va], k),
                        "hessian_free_cosine": class_metrics(hf_cos, tr_cls[pick_tr], va_cls[pick_va], k),
                        "forvalue_exact": class_metrics(fv, tr_cls[pick_tr], va_cls[pick_va], k),
                        "forvalue_cosine": class_metrics(fvc, tr_cls[pick_tr], va_cls[pick_va], k)},
            "hf_s_per_sample_fwd_bwd": t_grad / n, "hf_s_per_sample_projection": t_proj / n,
            "hf_hash_setup_s": t_hash, "n_params": int(sum(q.numel() for q in params))}


# ---------------------------------------------------------------- report
def report():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    PLOTS.mkdir(parents=True, exist_ok=True)
    res = {t: json.loads((RESULTS / f"quality_{t}.json").read_text()) for t in ["sentence", "math", "math_reason"]
           if (RESULTS / f"quality_{t}.json").exists()}
    lines = []
    if res:
        methods = list(next(iter(res.values()))["metrics"])
        lines.append("| method | " + " | ".join(res) + " |")
        lines.append("|---|" + "---|" * len(res))
        for m in methods:
            cells = [f"{r['metrics'][m]['auc']:.3f}±{r['metrics'][m]['auc_std']:.3f} / "
                     f"{r['metrics'][m]['recall']:.3f}±{r['metrics'][m]['recall_std']:.3f}" if m in r["metrics"] else "—"
                     for r in res.values()]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Agreement with exact (per-target Spearman mean (min), top-k / top-90 overlap):")
        lines.append("")
        lines.append("| method | " + " | ".join(res) + " |")
        lines.append("|---|" + "---|" * len(res))
        for m in methods:
            if m == "exact":
                continue
            cells = []
            for r in res.values():
                a = r["agreement_with_exact"].get(m)
                k = r["k_recall"]
                cells.append(f"{a['spearman']:.3f} ({a['spearman_min']:.2f}) / {a[f'top{k}_overlap']:.2f} / "
                             f"{a['top90_overlap']:.2f}" if a else "—")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Time (s, train rows; forward shared by all methods):")
        lines.append("")
        keys = sorted({k for r in res.values() for k in r["time_train_s"]})
        lines.append("| | " + " | ".join(res) + " |")
        lines.append("|---|" + "---|" * len(res))
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(f"{r['time_train_s'].get(key, 0):.1f}" for r in res.values()) + " |")
        for key in ["train_tokens", "val_tokens", "forward_tokens_per_s", "wall_s", "peak_rss_mib",
                    "total_unique_size", "topk_unique_5_mean_batch_size", "topk_unique_32_mean_batch_size"]:
            lines.append(f"| {key} | " + " | ".join(f"{r.get(key, 0):.0f}" for r in res.values()) + " |")
        # AUC vs sketch dim
        fig, axes = plt.subplots(1, len(res), figsize=(4 * len(res), 3.2), squeeze=False)
        for ax, (t, r) in zip(axes[0], res.items()):
            dims = sorted({int(m.split("_")[1]) for m in r["metrics"] if m.startswith("tensorsketch")})
            for s in (0, 1):
                ax.plot(dims, [r["metrics"][f"tensorsketch_{D}_s{s}"]["auc"] for D in dims], "o-", label=f"TS seed {s}")
            ax.axhline(r["metrics"]["exact"]["auc"], color="k", ls="--", label="exact")
            for s in (0, 1):
                kk = [m for m in r["metrics"] if m.startswith("kronecker") and m.endswith(f"s{s}")]
                if kk:
                    ax.plot([4096], [r["metrics"][kk[0]]["auc"]], "x", ms=8, label=f"Kron 64x64 s{s}")
            ax.set_xscale("log", base=2); ax.set_title(t); ax.set_xlabel("sketch dim"); ax.set_ylabel("AUC")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout(); fig.savefig(PLOTS / "quality_auc_vs_sketch_dim.png", dpi=110); plt.close(fig)
        # time per method
        fig, ax = plt.subplots(figsize=(8, 3.5))
        keys = [k for k in keys if not k.endswith("_total")]
        w = 0.8 / len(res)
        for j, (t, r) in enumerate(res.items()):
            ax.barh(np.arange(len(keys)) + j * w, [r["time_train_s"].get(k, 0) for k in keys], w, label=t)
        ax.set_yticks(np.arange(len(keys)) + 0.4 - w / 2, keys, fontsize=7); ax.set_xlabel("seconds (train rows)")
        ax.legend(); fig.tight_layout(); fig.savefig(PLOTS / "quality_time_per_method.png", dpi=110); plt.close(fig)
    nf = RESULTS / "quality_noisy.json"
    if nf.exists():
        noisy = json.loads(nf.read_text())
        lines += ["", "Noisy (AUC of −value vs corruption; clean fraction in top 10% / 20%; base clean rate):", ""]
        lines.append("| task | method | AUC | clean top10% | clean top20% | base |")
        lines.append("|---|---|---|---|---|---|")
        for t, r in noisy.items():
            for m, v in r["noisy"].items():
                lines.append(f"| {t} | {m} | {v['auc']:.3f} | {v['clean_top10']:.2f} | {v['clean_top20']:.2f} | "
                             f"{v['base_clean']:.2f} |")
        ms = ["exact", "cosine", "emb", "tensorsketch_4096_s0"]
        fig, axes = plt.subplots(len(noisy), len(ms), figsize=(3.2 * len(ms), 2.6 * len(noisy)), squeeze=False)
        for row, (t, r) in zip(axes, noisy.items()):
            c = np.array(r["corrupted"], bool)
            for ax, m in zip(row, ms):
                v = np.array(r["values"][m])
                bins = np.linspace(v.min(), v.max(), 30)
                ax.hist(v[~c], bins, alpha=.6, label="clean"); ax.hist(v[c], bins, alpha=.6, label="corrupted")
                ax.set_title(f"{t}: {m} (AUC {r['noisy'][m]['auc']:.3f})", fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout(); fig.savefig(PLOTS / "quality_noisy_distributions.png", dpi=110); plt.close(fig)
    hf = RESULTS / "quality_hessian_free.json"
    if hf.exists():
        r = json.loads(hf.read_text())
        lines += ["", f"Hessian-free subset ({r['task']}, {r['n_train']} train × {r['n_val']} val, {r['projection']}):", ""]
        lines.append("| method | AUC | recall |")
        lines.append("|---|---|---|")
        for m, v in r["metrics"].items():
            lines.append(f"| {m} | {v['auc']:.3f}±{v['auc_std']:.3f} | {v['recall']:.3f}±{v['recall_std']:.3f} |")
        lines.append("")
        lines.append(f"s/sample: Hessian-free fwd+bwd {r['hf_s_per_sample_fwd_bwd']:.3f} + projection "
                     f"{r['hf_s_per_sample_projection']:.3f}; For-Value {r['fv_s_per_sample']:.3f} "
                     f"→ ratio {r['ratio']:.1f}× (fwd+bwd only: {r['ratio_fwd_bwd_only']:.1f}×)")
    text = "\n".join(lines)
    (RESULTS / "quality_tables.md").write_text(text + "\n")
    print(text)


# ---------------------------------------------------------------- main
def main():
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    import forvalue_ray
    T = time.perf_counter()
    vm = forvalue_ray.load_model()
    print(f"model loaded {time.perf_counter() - T:.1f}s", flush=True)
    noisy_tasks = [t for t in args.noisy_tasks.split(",") if t]
    noisy_all = {}
    for task in [t for t in args.tasks.split(",") if t]:
        out, S, cache, data = run_task(vm, task, 0.0)
        out["config"] = vars(args)
        if task == args.tasks.split(",")[0]:  # once: the loop's exact pairwise equals the library's
            ref = forvalue_ray.pairwise_scores(vm, [{"text": r["text"]} for r in data[0][:6]],
                                               [{"text": r["text"]} for r in data[1][:4]])
            mine = S["exact"][:6, :4]
            assert np.allclose(mine, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max()), (mine, ref)
            out["check_vs_pairwise_scores_max_rel"] = float(np.abs(mine - ref).max() / np.abs(ref).max())
        (RESULTS / f"quality_{task}.json").write_text(json.dumps(out, indent=1))
        m = out["metrics"]
        print(f"[{task}] wall {out['wall_s']:.0f}s exact {m['exact']['auc']:.3f}/{m['exact']['recall']:.3f} "
              f"emb {m['emb']['auc']:.3f} ts4096 {m['tensorsketch_4096_s0']['auc']:.3f} "
              f"total {time.perf_counter() - T:.0f}s", flush=True)
        if task in noisy_tasks:
            nout, _, _, _ = run_task(vm, task, args.noise, cache)
            noisy_all[task] = nout
            (RESULTS / "quality_noisy.json").write_text(json.dumps(noisy_all, indent=1))
            print(f"[{task} noisy] exact AUC {nout['noisy']['exact']['auc']:.3f} total {time.perf_counter() - T:.0f}s",
                  flush=True)
        if task == args.hf_task:
            hf = run_hessian_free(vm, task, S, data)
            t = out["time_train_s"]
            fv = (t["forward"] + t["pass1_base"] + t["exact_pairwise"]) / out["n_train"]
            hf["fv_s_per_sample"] = fv
            hf["ratio"] = (hf["hf_s_per_sample_fwd_bwd"] + hf["hf_s_per_sample_projection"]) / fv
            hf["ratio_fwd_bwd_only"] = hf["hf_s_per_sample_fwd_bwd"] / fv
            (RESULTS / "quality_hessian_free.json").write_text(json.dumps(hf, indent=1))
            print(f"[hessian-free] {hf['metrics']['hessian_free']} ratio {hf['ratio']:.1f} "
                  f"total {time.perf_counter() - T:.0f}s", flush=True)
    print(f"total {time.perf_counter() - T:.0f}s peak RSS {rss_mib():.0f} MiB")


if __name__ == "__main__":
    if not args.report:
        main()
    report()
