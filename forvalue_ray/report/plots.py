"""The report's figures, as PNG bytes: score distributions, score against difficulty, rejection reasons."""

from __future__ import annotations

import io as _io

import numpy as np

from .scan import MAX_GROUP_CURVES, MAX_TARGET_ROWS, Scan


def _png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ (ranks without tie averaging; the sample is continuous-valued)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a[ok])), np.argsort(np.argsort(b[ok]))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def figures(scan: Scan, mode: str, names: list, value_label: str) -> dict[str, tuple[str, bytes]]:
    """name → (caption, PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    s = scan.sample.cols
    if s:
        if mode == "groups" and len(names) > 1:
            fig, ax = plt.subplots(figsize=(7.5, 3.6))
            mat = s["scores"]
            bins = np.histogram_bin_edges(mat, bins=40)
            for k in range(min(len(names), MAX_GROUP_CURVES)):
                ax.hist(mat[:, k], bins=bins, histtype="step", lw=1.5, label=str(names[k]))
            ax.legend(fontsize=7, title="target group", title_fontsize=7)
            ax.set_xlabel("score against the group")
            caption = "Score distribution per target group"
        elif mode == "pairwise":
            fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
            ax.hist(s["value"], bins=40)
            ax.set_xlabel("mean score over the targets")
            summary = scan.summary.table()[:MAX_TARGET_ROWS]
            ax2.errorbar(np.arange(len(summary)), [t["mean"] for t in summary], yerr=[t["std"] for t in summary],
                         fmt="o", ms=3, capsize=2)
            ax2.set_xlabel("target (order of targets.parquet)")
            ax2.set_ylabel("score: mean ± std over rows")
            caption = "Score distribution (mean over targets) and per-target summary"
        else:
            fig, ax = plt.subplots(figsize=(7.5, 3.6))
            ax.hist(s["value"], bins=40)
            ax.set_xlabel(value_label)
            caption = "Score distribution"
        ax.set_ylabel(f"rows (sample of {len(s['value']):,})")
        fig.tight_layout()
        figs["distribution"] = (caption, _png(fig))
    if s and np.isfinite(s["nll"]).any():
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, key, label in ((axes[0], "nll", "mean NLL of the valued tokens"),
                               (axes[1], "n_tokens", "valued tokens")):
            ax.scatter(s[key], s["value"], s=6, alpha=0.4, lw=0)
            ax.set_xlabel(label)
            ax.set_ylabel(value_label)
            ax.set_title(f"Spearman ρ = {rank_correlation(s[key], s['value']):.2f}", fontsize=9)
        if np.all(s["n_tokens"] > 0):
            axes[1].set_xscale("log")
        fig.tight_layout()
        figs["value_vs_difficulty"] = ("Score against NLL and against length: is the value just 'easy' or 'short'?",
                                       _png(fig))
    if scan.rejected:
        cats = sorted(scan.rejected.items(), key=lambda kv: -kv[1][0])
        fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(cats) + 1.2))
        ax.barh([c[:60] for c, _ in cats][::-1], [v[0] for _, v in cats][::-1])
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("rejected rows")
        fig.tight_layout()
        figs["rejected"] = ("Rejected rows by reason", _png(fig))
    return figs
