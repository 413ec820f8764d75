"""Engine throughput and peak memory on CPU: plain forward with logits vs For-Value readouts.

    python benchmarks/bench_engine.py [--model smollm2] [--seq 256] [--batch 8] [--iters 3] [--dtype float32]
        [--methods forward_logits,value_mean]

Each method runs in its own process so peak RSS (ru_maxrss) is its own. Inputs are random token ids,
every position valued (text rows); the pairwise reference holds 100 targets of 32 valued tokens.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("forward_logits", "value_mean", "sketch_4096", "sketch_8192", "sketch_16384", "sketch_32768", "pairwise_100")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args) -> dict:
    import numpy as np
    import torch

    from forvalue_ray import load_model
    from forvalue_ray.encode import IGNORE, Encoded
    from forvalue_ray.engine import Scorer, build_reference, finish_target_stats, target_partial

    torch.set_num_threads(args.threads)
    vm = load_model(args.model, dtype=args.dtype)
    rng = np.random.default_rng(0)
    V = vm.head.vocab_size

    def rows(n, length, valued=None):
        out = []
        for i in range(n):
            ids = rng.integers(0, V, length)
            labels = ids.copy()
            labels[: length - (valued or length - 1)] = IGNORE
            out.append(Encoded(str(i), ids, labels))
        return out

    batch = rows(args.batch, args.seq)
    base_rss = rss_mib()
    if args.method == "forward_logits":
        ids = torch.as_tensor(np.stack([r.input_ids for r in batch]))

        def step():
            with torch.no_grad(), vm.matmul_precision():
                logits = vm.model(input_ids=ids).logits
                torch.log_softmax(logits.float(), -1)  # what any per-token loss needs at least
    else:
        kw = {"max_tokens": args.seq * args.batch}
        if args.method == "value_mean":
            targets = rows(8, 64, 32)
            total, counts = target_partial(vm, targets, [0] * len(targets), 1)
            scorer = Scorer(vm, stats=finish_target_stats(total, counts, ["mean"], False), **kw)
        elif args.method.startswith("sketch_"):
            scorer = Scorer(vm, sketch_dim=int(args.method.split("_")[1]), **kw)
        else:
            scorer = Scorer(vm, reference=build_reference(vm, rows(100, 64, 32)), **kw)
        base_rss = rss_mib()

        def step():
            scorer(batch)
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    dt = (time.perf_counter() - t0) / args.iters
    return {"method": args.method, "tokens_per_s": args.batch * args.seq / dt, "seconds_per_batch": dt,
            "peak_rss_mib": rss_mib(), "peak_rss_over_setup_mib": rss_mib() - base_rss}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, bfloat16-autocast or auto (the product's default)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {','.join(METHODS)}; the first "
                   "is the baseline of 'x forward'")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "engine_cpu.json"))
    args = p.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    results = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", m] + [f"--{k}={getattr(args, k)}" for k in
                                                           ("model", "seq", "batch", "iters", "threads", "dtype")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    plain = results[0]["tokens_per_s"]
    for r in results:
        r["throughput_vs_forward"] = r["tokens_per_s"] / plain
    meta = {"command": "python benchmarks/bench_engine.py " + " ".join(sys.argv[1:]), "cpu_count": os.cpu_count(),
            "seq": args.seq, "batch": args.batch, "model": args.model, "dtype": args.dtype}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print("| method | tokens/s | × forward | peak RSS MiB | peak over setup MiB |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['throughput_vs_forward']:.2f} | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_over_setup_mib']:.0f} |")


if __name__ == "__main__":
    main()
