"""Measured GPU throughput, model FLOP utilisation and peak memory of every path, beside the roofline estimate
of bench_flops.py, for each shape — on one H200 in under 5 minutes.

    pip install -e . && python benchmarks/bench_gpu.py          # a GPU machine (offline: torch + transformers
                                                                # suffice, `python benchmarks/bench_gpu.py`)
    python benchmarks/bench_gpu.py --device cpu --tiny --iters 1   # the same code on tiny shapes, on a CPU

Random-weight models built from the configs in ``shapes.py`` (bf16, sdpa attention), rows of ``--seq`` tokens
(every one but the first valued; image rows: one 448×448 image + 256 valued tokens), ``--batch-tokens`` per
forward, the workloads of ``bench_flops.prepare`` (the engine's Scorer, or the model's own forward with logits).
tokens/s counts valued tokens; MFU = tokens/s × the path's counted FLOPs per token ÷ the bf16 dense peak. The
estimate comes from ``results/flops.json`` when it was counted with the same --seq and --batch-tokens, else it is
counted here. Results are written after every measurement (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # shapes, bench_flops; the package itself without an install
import bench_flops  # noqa: E402
import shapes  # noqa: E402


def estimates(args) -> dict:
    """(shape, path) → the counted FLOPs and roofline of bench_flops, for these settings."""
    path = os.path.join(HERE, "results", "flops.json")
    if os.path.exists(path) and not args.tiny:
        saved = json.load(open(path))
        m = saved["meta"]
        if (m["seq"], m["batch_tokens"], m.get("tiny", False)) == (args.seq, args.batch_tokens, False):
            return {(r["shape"], r["path"]): r for r in saved["results"]}
    out = {}
    for name in args.shapes.split(","):
        shape = shapes.tiny(shapes.SHAPES[name]) if args.tiny else shapes.SHAPES[name]
        for r in bench_flops.count(name, shape, args.paths.split(","), args.seq, args.batch_tokens):
            out[name, r["path"]] = r
    return out


def measure(vm, shape, path: str, args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row_len = args.seq if not shapes.is_vision(shape) else None
    rows = shapes.make_rows(shape, vm.model.config, args.seq, 1)
    row_len = row_len or len(rows[0].input_ids)
    rows = shapes.make_rows(shape, vm.model.config, args.seq, max(1, args.batch_tokens // row_len))
    valued = sum(r.n_valued for r in rows)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        run = bench_flops.prepare(path, vm, rows, args.batch_tokens)
        run()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            run()
        sync()
    dt = (time.perf_counter() - t0) / args.iters
    return {"tokens_per_s": valued / dt, "seconds_per_batch": dt, "valued_tokens_per_batch": valued,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny versions of the shapes (a dry run of this script)")
    p.add_argument("--shapes", default=",".join(shapes.SHAPES))
    p.add_argument("--paths", default=",".join(bench_flops.PATHS))
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=bench_flops.PEAK_FLOPS["bf16"] / 1e12,
                   help="dense bf16 peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "gpu_h200.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    t_start = time.time()
    est = estimates(args)
    meta = {"command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:]), "device": (
        torch.cuda.get_device_name() if device.type == "cuda" else "cpu"), "torch": torch.__version__,
        "seq": args.seq, "batch_tokens": args.batch_tokens, "iters": args.iters, "peak_tflops": args.peak_tflops,
        "tiny": args.tiny}
    results = []
    print(f"{'shape':14s} {'path':20s} {'tokens/s':>12s} {'est tokens/s':>13s} {'meas/est':>8s} {'MFU':>6s} "
          f"{'peak GiB':>8s}", flush=True)
    for name in args.shapes.split(","):
        shape = shapes.tiny(shapes.SHAPES[name]) if args.tiny else shapes.SHAPES[name]
        from forvalue_ray.model import ValuationModel

        vm = ValuationModel(shapes.build_model(shape, device), None, {"source": f"random {name}"})
        for path in args.paths.split(","):
            r = {"shape": name, "path": path, **measure(vm, shape, path, args, device)}
            e = est[name, path]
            r.update(est_tokens_per_s=e["estimate_tokens_per_s"], gflop_per_token=e["gflop_per_token_total"],
                     mfu=r["tokens_per_s"] * e["gflop_per_token_total"] * 1e9 / (args.peak_tflops * 1e12))
            r["measured_over_estimate"] = r["tokens_per_s"] / r["est_tokens_per_s"]
            results.append(r)
            peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
            print(f"{name:14s} {path:20s} {r['tokens_per_s']:12,.0f} {r['est_tokens_per_s']:13,.0f} "
                  f"{r['measured_over_estimate']:8.2f} {r['mfu']:6.3f} {peak:>8s}", flush=True)
            with open(args.out, "w") as f:
                json.dump({"meta": {**meta, "wall_s": round(time.time() - t_start, 1)}, "results": results}, f,
                          indent=1)
        del vm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
