"""GPU throughput and model FLOP utilisation of value and sketch, for a lent H200 (finishes in < 5 min).

Also an image-text model shaped like Qwen2.5-VL-3B (random weights, 448×448 images).

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


VLM_SHAPE = dict(model_type="qwen2_5_vl", text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                 num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
                 vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=2048, num_heads=16,
                                    intermediate_size=3420, patch_size=14, spatial_merge_size=2))


def bench_vlm(iters: int, shape: dict = VLM_SHAPE, device: str = "cuda", dtype=torch.bfloat16) -> dict:
    """Qwen2.5-VL-3B-shaped: rows of one 448×448 image (256 merged image tokens) + 256 response tokens."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from forvalue_ray import from_hf
    from forvalue_ray.encode import Encoded
    from forvalue_ray.engine import Scorer, TargetStats

    cfg = dict(shape)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    vm = from_hf(model.eval(), tokenizer=None, source="random")
    grid, merge = (1, 32, 32), 4
    n_img_tokens = grid[1] * grid[2] // merge
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        ids = np.r_[[config.vision_start_token_id], [config.image_token_id] * n_img_tokens, [config.vision_end_token_id],
                    rng.integers(0, 1000, 256)]
        labels = np.r_[[-100] * (n_img_tokens + 2), ids[n_img_tokens + 2:]]
        patch = 3 * 2 * config.vision_config.patch_size ** 2  # channels × temporal patch × patch²
        vision = {"pixel_values": rng.standard_normal((grid[1] * grid[2], patch)).astype(np.float32),
                  "image_grid_thw": np.array([grid]),
                  "mm_token_type_ids": np.r_[[0], [1] * n_img_tokens, [0] * 257][None]}
        rows.append(Encoded(str(i), ids.astype(np.int64), labels.astype(np.int64), vision))
    stats = TargetStats(torch.randn(1, *vm.head.weight.shape, device=device) * 1e-3, ["mean"], False, [1])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for method, kw in (("value", {"stats": stats}), ("sketch", {"sketch_dim": 4096})):
        scorer = Scorer(vm, max_tokens=16 * 600, **kw)
        scorer(rows)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            scorer(rows)
        sync()
        dt = (time.perf_counter() - t0) / iters
        out[method] = {"images_per_s": round(len(rows) / dt, 1), "tokens_per_s": round(len(rows) * 256 / dt)}
    return out


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
    vlm = bench_vlm(args.iters)
    print({"qwen2.5-vl-3b": vlm}, flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results, "qwen2.5-vl-3b": vlm}, f, indent=2)


if __name__ == "__main__":
    main()
