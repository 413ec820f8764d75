"""Image-text throughput on CPU for the tiny Qwen2-VL and Idefics3 configs: images/s and tokens/s of value
(mean) and sketch, processor time included separately.

    python benchmarks/bench_vision.py [--rows 32] [--iters 3]
"""

import argparse
import json
import os
import time

import torch

from forvalue_ray import encode_rows, from_hf, target_statistics
from forvalue_ray.engine import Scorer
from forvalue_ray.testing.tiny_vlm import image_bytes, tiny_idefics3, tiny_qwen2_vl


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "vision_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    colors = [(230, 20, 20), (20, 180, 20), (20, 20, 230)]
    shapes = ["circle", "square", "triangle"]
    rows = [{"images": [image_bytes(colors[i % 3], shape=shapes[(i // 3) % 3])] * (1 + i % 2),
             "prompt": "Describe the image.", "response": f"a {['red', 'green', 'blue'][i % 3]} {shapes[(i // 3) % 3]}"}
            for i in range(args.rows)]
    results = []
    for name, build in (("qwen2_vl", tiny_qwen2_vl), ("idefics3", tiny_idefics3)):
        model, processor = build(dtype=torch.float32)
        vm = from_hf(model.eval(), processor)
        t0 = time.perf_counter()
        enc = encode_rows(vm, rows)
        encode_s = time.perf_counter() - t0
        n_images = sum(len(r["images"]) for r in rows)
        n_tokens = sum(e.n_valued for e in enc)
        stats = target_statistics(vm, rows[:4])
        for method, scorer in (("value", Scorer(vm, stats=stats)), ("sketch", Scorer(vm, sketch_dim=4096))):
            scorer(enc)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                scorer(enc)
            dt = (time.perf_counter() - t0) / args.iters
            results.append({"family": name, "method": method, "images_per_s": n_images / dt,
                            "valued_tokens_per_s": n_tokens / dt, "processor_images_per_s": n_images / encode_s})
            print(json.dumps(results[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/bench_vision.py", "rows": args.rows, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
