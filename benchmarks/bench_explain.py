"""Do the most negative tokens of `forvalue-ray explain` find the damaged words of a row?

    HF_HUB_OFFLINE=1 python benchmarks/bench_explain.py --model smollm2          # ~5 min at 1 thread
    python benchmarks/bench_explain.py --report                                  # the table from results/explain_*.json

Rows: step-by-step math responses (``tasks``, task ``math_steps``), each damaged in ONE known span of
words, newlines kept so nothing but the words differs (the noisy benchmark's ``spans_keep_lines`` protocol, with
its span lengths and inserted words):

- ``delete``: L words removed; the damaged token is the first word after the gap (what no longer follows);
- ``insert``: L words from the generator's ``INSERTED_WORDS`` (foo, bar, baz) inserted after a word;
- ``replace``: L consecutive words replaced by words of another problem's solution (plausible vocabulary).

Every row is valued on its response tokens against clean validation rows of the same classes, and explained
(:func:`forvalue_ray.token_contributions`) with the paper's mean score (``mean``), its cosine (``cosine``) and
centered on the mean gradient of 24 clean rows of the same problems (``centered``); ``abs`` ranks by |c_t| of the
mean score (a large term of either sign).
A valued token is damaged when its characters overlap a damaged word. Per row: the token-level AUC of −c_t
(more negative = more damaged; 0.5 = chance) and whether the worst 3-token window (of valued tokens, as the
report shows it) overlaps the damaged span, against chance (the share of 3-token windows that do). Baseline: the
token's surprisal −log p(y_t) (``nll``), the obvious detector that needs no target set.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KINDS = ("delete", "insert", "replace")
METHODS = ("mean", "cosine", "centered", "abs", "nll")  # abs: |c_t| of the mean score (large either way)
MAX_SPAN = 4
SAMPLE_PER_CLASS = 4  # clean rows per class: the centering sample


def damage(response: str, rng: random.Random, kind: str, donor_words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """(damaged response, damaged character ranges in it): one span of L words deleted, inserted or replaced;
    lines kept; the leading whitespace and the ``</s>`` end untouched."""
    from tasks import INSERTED_WORDS, _span_length

    content = response[: -len("</s>")]
    lead = content[: len(content) - len(content.lstrip())]
    words = [(line, w) for line, text in enumerate(content[len(lead):].split("\n")) for w in text.split()]
    n = min(_span_length(rng), MAX_SPAN)
    if kind == "delete":
        i = rng.randrange(0, len(words) - n)  # a word must follow the gap
        out = [(ln, w, False) for ln, w in words[:i]] + [(ln, w, j == 0) for j, (ln, w) in enumerate(words[i + n:])]
    elif kind == "insert":
        i = rng.randrange(0, len(words))
        new = [(words[i][0], rng.choice(INSERTED_WORDS), True) for _ in range(n)]
        out = [(ln, w, False) for ln, w in words[:i + 1]] + new + [(ln, w, False) for ln, w in words[i + 1:]]
    else:
        i = rng.randrange(0, len(words) - n + 1)
        new = [(ln, rng.choice([d for d in donor_words if d != w] or donor_words), True) for ln, w in words[i:i + n]]
        out = [(ln, w, False) for ln, w in words[:i]] + new + [(ln, w, False) for ln, w in words[i + n:]]
    text, spans, line = lead, [], out[0][0]
    for k, (ln, w, bad) in enumerate(out):
        if k:
            text += "\n" if ln != line else " "
        line = ln
        if bad:
            spans.append((len(text), len(text) + len(w)))
        text += w
    return text + "</s>", spans


def make_rows(n_rows: int, n_classes: int, n_val: int, seed: int):
    from tasks import make_task

    per_class = -(-n_rows // n_classes)
    train, val = make_task("math_steps", seed=seed, n_classes=n_classes, n_train_per_class=per_class + SAMPLE_PER_CLASS,
                           n_val_per_class=n_val)
    sample = [r for j, r in enumerate(train) if j % (per_class + SAMPLE_PER_CLASS) >= per_class]
    train = [r for j, r in enumerate(train) if j % (per_class + SAMPLE_PER_CLASS) < per_class]
    rng = random.Random(f"bench-explain/{seed}")
    rows = []
    for j, r in enumerate(train[:n_rows]):
        kind = KINDS[j % len(KINDS)]
        donor = train[(j + per_class) % len(train)]["response"][: -len("</s>")].split()  # another class's words
        response, spans = damage(r["response"], rng, kind, donor)
        rows.append({"id": r["id"], "prompt": r["prompt"], "response": response, "kind": kind, "spans": spans,
                     "class": r["class"]})
    return rows, val, sample


def token_surprisal(vm, encoded) -> list[np.ndarray]:
    """−log p(token) at each position of each row (0 at the first)."""
    out = []
    for r in encoded:
        ids = torch.as_tensor(r.input_ids)[None]
        with torch.no_grad():
            logits = vm.model(input_ids=ids).logits[0, :-1].double()
        lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
        out.append(np.r_[0.0, -lp.numpy()])
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(a damaged token outranks an undamaged one), ties counted half."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def windows(valued: np.ndarray, width: int = 3) -> list[np.ndarray]:
    pos = np.flatnonzero(valued)
    w = min(width, len(pos))
    return [pos[k:k + w] for k in range(len(pos) - w + 1)]


def evaluate(rows, encoded, contributions: dict, tokenizer) -> dict:
    from forvalue_ray.explain_page import offsets, token_pieces

    per_row = []
    for r, enc, *cs in zip(rows, encoded, *(contributions[m] for m in METHODS)):
        pieces = token_pieces(tokenizer, enc.input_ids)
        starts = np.asarray(offsets(pieces))
        ends = starts + np.asarray([len(p) for p in pieces])
        valued = np.r_[False, enc.labels[1:] != -100]
        text = "".join(pieces)
        first = int(np.flatnonzero(valued)[0])
        base = int(starts[first])
        assert text[base:].startswith(r["response"]), (text[base:base + 40], r["response"][:40])
        bad = np.zeros(len(pieces), dtype=bool)
        for s0, s1 in r["spans"]:
            bad |= (starts < base + s1) & (ends > base + s0)
        bad &= valued
        wins = windows(valued)
        hit_chance = float(np.mean([bad[w].any() for w in wins]))
        res = {"id": r["id"], "kind": r["kind"], "valued": int(valued.sum()), "damaged": int(bad.sum()),
               "window_chance": hit_chance}
        for m, c in zip(METHODS, cs):
            detect = -np.asarray(c) if m != "nll" else np.asarray(c)  # higher = more suspect
            res[f"auc_{m}"] = auc(detect[valued], bad[valued])
            worst = max(wins, key=lambda w: detect[w].sum())
            res[f"window_{m}"] = bool(bad[worst].any())
        per_row.append(res)
    return per_row


def summarise(per_row: list[dict]) -> dict:
    out = {}
    for kind in ("all",) + KINDS:
        rs = [r for r in per_row if kind == "all" or r["kind"] == kind]
        out[kind] = {"rows": len(rs), "window_chance": round(float(np.mean([r["window_chance"] for r in rs])), 3),
                     **{f"auc_{m}": round(float(np.nanmean([r[f"auc_{m}"] for r in rs])), 3) for m in METHODS},
                     **{f"window_{m}": round(float(np.mean([r[f"window_{m}"] for r in rs])), 3) for m in METHODS}}
    return out


def run(args) -> dict:
    import forvalue_ray as fv

    torch.set_num_threads(args.threads)
    t0 = time.time()
    vm = fv.load_model(args.model)
    rows, val, sample = make_rows(args.n_rows, args.n_classes, args.n_val_per_class, args.seed)
    train = [{"id": r["id"], "prompt": r["prompt"], "response": r["response"]} for r in rows]
    encoded = fv.encode_rows(vm, train, form="prompt_response")
    targets = [{"prompt": v["prompt"], "response": v["response"]} for v in val]
    contributions, timing = {}, {}
    center = [{"prompt": v["prompt"], "response": v["response"]} for v in sample]
    for method, normalize in (("mean", False), ("cosine", True), ("centered", False)):
        t = time.time()
        stats = fv.target_statistics(vm, targets, normalize=normalize, form="prompt_response",
                                     center=center if method == "centered" else None)
        tc = fv.token_contributions(vm, encoded, stats)
        contributions[method] = tc.contributions
        scores = fv.score_against(vm, encoded, stats)[:, 0]
        gap = max(abs(c.sum() - s) / max(np.abs(c).sum(), 1e-30) for c, s in zip(tc.contributions, scores))
        timing[method] = {"seconds": round(time.time() - t, 1), "max_sum_gap_relative": float(gap)}
    contributions["abs"] = [-np.abs(c) for c in contributions["mean"]]
    t = time.time()
    contributions["nll"] = token_surprisal(vm, encoded)
    timing["nll"] = {"seconds": round(time.time() - t, 1)}
    per_row = evaluate(rows, encoded, contributions, vm.tokenizer)
    return {"config": vars(args), "model": vm.provenance, "seconds": round(time.time() - t0, 1), "timing": timing,
            "summary": summarise(per_row), "rows": per_row,
            "examples": [{"id": r["id"], "kind": r["kind"], "response": r["response"], "spans": r["spans"]}
                         for r in rows[:6]]}


def table(result: dict) -> str:
    names = " / ".join(m if m != "abs" else "\\|c\\|" for m in METHODS)
    lines = [f"| rows | n | chance: worst window hits | worst window hits: {names} | token AUC: {names} |",
             "|---|---|---|---|---|"]
    for kind, s in result["summary"].items():
        hits = " / ".join(f"{s[f'window_{m}']:.2f}" for m in METHODS)
        aucs = " / ".join(f"{s[f'auc_{m}']:.3f}" for m in METHODS)
        lines.append(f"| {kind} | {s['rows']} | {s['window_chance']:.2f} | {hits} | {aucs} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n-rows", type=int, default=42, help="damaged rows (a third of each kind)")
    p.add_argument("--n-classes", type=int, default=6)
    p.add_argument("--n-val-per-class", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    path = RESULTS / f"explain_{Path(args.model).stem}.json"
    if args.report:
        print(table(json.loads(path.read_text())))
        return
    result = run(args)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    print(f"{result['seconds']} s → {path}")


if __name__ == "__main__":
    main()
