"""Peak memory of the exact readout on one long row: SmolLM2-135M's LM head, T = 2k … 32k valued tokens.

What is measured is ours, the readout after the forward pass: mean-mode value against a target statistic
plus the cosine norm ‖G‖² (the path whose per-row [T, T] Gram used to grow quadratically), and the default
sketch. Hidden states are synthetic ([T, d], the scale of SmolLM2's), because the CPU forward of a 32k-token
row is not what this benchmark is about. Each T runs in a fresh process; the figure is the peak RSS above
the process's state right before the readout (head, statistic and hidden states already allocated).

    python benchmarks/bench_long_rows.py            # → benchmarks/results/long_rows_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "long_rows_cpu.json"


def measure(tokens: int, path: str) -> dict:
    import psutil
    import torch

    import forvalue_ray as fv
    from forvalue_ray import engine
    from forvalue_ray.engine import Scorer, TargetStats, ValuedTokens

    torch.manual_seed(0)
    vm = fv.load_model("smollm2")
    vocab, d = vm.head.weight.shape
    stats = TargetStats(torch.randn(1, vocab, d) * 1e-3, ["mean"], True, [1])
    h = torch.randn(tokens, d) * 3.0
    y = torch.randint(0, vocab, (tokens,))
    vt = ValuedTokens(h=h, y=y, seg=torch.zeros(tokens, dtype=torch.long), n_rows=1)
    engine.valued_tokens = lambda *a, **k: vt  # the forward is not what is measured
    scorer = Scorer(vm, stats=stats, normalize=True) if path == "cosine" else Scorer(vm, sketch_dim=16384)
    ids = torch.zeros(tokens + 1, dtype=torch.long).numpy()
    rows = [fv.Encoded("long", ids, ids)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    current = psutil.Process().memory_info().rss / 1024
    t0 = time.time()
    scorer(rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tokens": tokens, "path": path, "seconds": round(time.time() - t0, 2),
            "extra_peak_mib": round((peak - max(base, current)) / 1024, 1),
            "old_gram_mib_estimate": round(3 * tokens * tokens * 4 / 2**20, 1) if path == "cosine" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--paths", nargs="+", default=["cosine", "sketch"])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # a single measurement, in a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1])))
        return
    results = []
    for path in args.paths:
        for t in args.tokens:
            out = subprocess.run([sys.executable, __file__, "--one", str(t), path], capture_output=True, text=True,
                                 check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    RESULTS.write_text(json.dumps({"model": "SmolLM2-135M (V=49152, d=576)", "budget_elements": 1 << 23,
                                   "results": results}, indent=1))


if __name__ == "__main__":
    main()
