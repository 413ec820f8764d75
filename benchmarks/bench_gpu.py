"""GPU throughput and model FLOP utilisation of value and sketch, for a lent H200 (finishes in < 5 min).

    python benchmarks/bench_gpu.py [--out benchmarks/results/gpu_h200.json]

Random-weight models shaped like Qwen2.5-1.5B and Llama-3.1-8B (configs only, no downloads), bf16, seq 512
and 2048. MFU counts 2·N FLOPs per token for the forward plus the readout's LM-head products (logits +
one per target statistic for value; logits for sketch), against the GPU's dense bf16 peak (--peak-tflops).
"""

import argparse
import json
import time

import numpy as np
import torch

SHAPES = {
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def build(shape: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    from forvalue_ray import from_hf

    cfg = dict(shape)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return from_hf(model.eval(), tokenizer=None, source="random")


def bench(vm, seq: int, batch_tokens: int, iters: int, **scorer_kw) -> float:
    from forvalue_ray.encode import Encoded
    from forvalue_ray.engine import Scorer

    rng = np.random.default_rng(0)
    n = max(1, batch_tokens // seq)
    rows = [Encoded(str(i), ids := rng.integers(0, vm.head.vocab_size, seq), np.r_[-100, ids[1:]]) for i in range(n)]
    scorer = Scorer(vm, max_tokens=batch_tokens, **scorer_kw)
    scorer(rows)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        scorer(rows)
    torch.cuda.synchronize()
    return n * seq * iters / (time.perf_counter() - t0)


def main():
    from forvalue_ray.engine import TargetStats

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/gpu_h200.json")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch-tokens", type=int, default=16384)
    args = p.parse_args()
    results = []
    for name, shape in SHAPES.items():
        vm = build(shape)
        n_params = sum(p.numel() for p in vm.model.parameters())
        head = vm.head.vocab_size * vm.head.weight.shape[1]
        stats = TargetStats(torch.randn(1, *vm.head.weight.shape, device="cuda") * 1e-3, ["mean"], False, [1])
        for seq in (512, 2048):
            for method, kw, extra_heads in (("value", {"stats": stats}, 2), ("sketch", {"sketch_dim": 4096}, 1)):
                tps = bench(vm, seq, args.batch_tokens, args.iters, **kw)
                flops = 2 * (n_params - (0 if shape["tie_word_embeddings"] else head)) + 2 * head * extra_heads
                results.append({"model": name, "seq": seq, "method": method, "tokens_per_s": round(tps),
                                "mfu": round(tps * flops / (args.peak_tflops * 1e12), 4),
                                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
                print(results[-1], flush=True)
        del vm, stats
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
