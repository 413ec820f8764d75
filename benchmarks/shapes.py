"""Model shapes and workloads shared by the FLOP accounting (bench_flops.py) and the GPU run (bench_gpu.py).

Configs are written here with the published shapes (no hub access); models are built from them with random
weights (or none, on the meta device). Every workload is the engine's own: a :class:`~forvalue_ray.engine.Scorer`
over encoded rows, against target statistics, a reference set or a sketch.
"""

from __future__ import annotations

import numpy as np
import torch

SHAPES = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=False, max_position_embeddings=131072),
    "gemma-3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                         num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                         query_pre_attn_scalar=256, sliding_window=512, tie_word_embeddings=True,
                         max_position_embeddings=32768),
    "qwen2.5-vl-3b": dict(model_type="qwen2_5_vl",
                          text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                           num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                                           tie_word_embeddings=True, max_position_embeddings=128000),
                          vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=2048, num_heads=16,
                                             intermediate_size=3420, patch_size=14, spatial_merge_size=2,
                                             window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
}

# the same families, a few layers of a few dimensions: a CPU dry run of every code path in seconds
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_VISION = {"depth": 2, "hidden_size": 64, "out_hidden_size": 128, "num_heads": 4, "intermediate_size": 128,
               "fullatt_block_indexes": [1]}

IMAGE_GRID = (1, 32, 32)  # one 448×448 image: 32×32 patches of 14 px, 256 merged image tokens
RESPONSE_TOKENS = 256  # valued tokens of an image row


def tiny(shape: dict) -> dict:
    """A few-layer, few-dimension version of a shape (same family, same code paths)."""
    out = dict(shape)
    if "text_config" in out:  # one 128-wide head (the multimodal RoPE sections assume head_dim 128), the image
        # placeholder ids moved inside the tiny vocabulary
        last = TINY["vocab_size"] - 1
        out["text_config"] = {**out["text_config"], **TINY, "hidden_size": 128, "num_attention_heads": 1,
                              "num_key_value_heads": 1, "eos_token_id": last - 4}
        out.update(vision_start_token_id=last - 3, vision_end_token_id=last - 2, image_token_id=last - 1,
                   video_token_id=last)
        out["vision_config"] = {**out["vision_config"], **TINY_VISION}
    else:
        out.update(TINY, **({"head_dim": 16} if "head_dim" in out else {}),
                   **({"query_pre_attn_scalar": 16} if "query_pre_attn_scalar" in out else {}))
    return out


def is_vision(shape: dict) -> bool:
    return "vision_config" in shape


def build_model(shape: dict, device, dtype=torch.bfloat16):
    """The model class for the shape's config, random weights on ``device`` (none on "meta")."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = dict(shape)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    cls = AutoModelForImageTextToText if is_vision(shape) else AutoModelForCausalLM
    with torch.device(device):
        model = cls.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def make_rows(shape: dict, config, seq: int, n_rows: int, seed: int = 0) -> list:
    """Encoded rows: text rows of ``seq`` tokens, every predicted token valued (seq − 1); image rows of one
    448×448 image (context) and RESPONSE_TOKENS valued response tokens."""
    from forvalue_ray.encode import IGNORE, Encoded

    rng = np.random.default_rng(seed)
    text = config.get_text_config()
    rows = []
    for i in range(n_rows):
        if not is_vision(shape):
            ids = rng.integers(0, text.vocab_size, seq)
            rows.append(Encoded(str(i), ids, np.r_[IGNORE, ids[1:]]))
            continue
        vc = config.vision_config
        special = min(config.vision_start_token_id, config.vision_end_token_id, config.image_token_id,
                      config.video_token_id)  # response ids below the image placeholders
        n_image = IMAGE_GRID[1] * IMAGE_GRID[2] // vc.spatial_merge_size ** 2
        ids = np.r_[config.vision_start_token_id, [config.image_token_id] * n_image, config.vision_end_token_id,
                    rng.integers(0, special, RESPONSE_TOKENS)].astype(np.int64)
        labels = np.r_[[IGNORE] * (n_image + 2), ids[n_image + 2:]].astype(np.int64)
        patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        vision = {"pixel_values": rng.standard_normal((IMAGE_GRID[1] * IMAGE_GRID[2], patch)).astype(np.float32),
                  "image_grid_thw": np.array([IMAGE_GRID]),
                  "mm_token_type_ids": np.r_[[0], [1] * n_image, [0] * (RESPONSE_TOKENS + 1)][None]}
        rows.append(Encoded(str(i), ids, labels, vision))
    return rows


def random_tokens(vm, n_tokens: int, n_owners: int, seed: int = 0):
    """Target-side valued tokens: h' drawn at the scale of real hidden states, y' uniform, lse' of the model's
    own head; ``seg`` spreads the tokens evenly over ``n_owners`` rows or groups."""
    from forvalue_ray.readout import ReferenceTokens, vocab_pass

    g = torch.Generator().manual_seed(seed)
    dev, d = vm.device, vm.head.weight.shape[1]
    h = torch.randn(n_tokens, d, generator=g).to(dev, vm.dtype) if dev.type != "meta" else \
        torch.empty(n_tokens, d, dtype=vm.dtype, device=dev)
    y = torch.randint(0, vm.head.vocab_size, (n_tokens,), generator=g).to(dev)
    seg = (torch.arange(n_tokens) * n_owners // n_tokens).to(dev)
    return ReferenceTokens(h, y, vocab_pass(vm.head, h, y).lse, seg)


def dense_stats(vm, n_groups: int, normalize: bool = False):
    """K dense statistics Ḡ [K, V, d], fp32 as the artifact stores them (random values at a gradient's scale)."""
    from forvalue_ray.engine import TargetStats

    shape = (n_groups, *vm.head.weight.shape)
    stats = torch.empty(shape, device=vm.device) if vm.device.type == "meta" else \
        torch.randn(shape, device=vm.device) * 1e-3
    return TargetStats(stats, [str(k) for k in range(n_groups)], normalize, [1] * n_groups)


def factored_stats(vm, n_groups: int, n_tokens: int, normalize: bool = False):
    """K factored statistics from ``n_tokens`` target tokens (:class:`~forvalue_ray.engine.TargetTokens`)."""
    from forvalue_ray.engine import TargetStats, TargetTokens

    tokens = random_tokens(vm, n_tokens, n_groups)
    weights = torch.full((n_tokens,), n_groups / n_tokens, device=vm.device)
    return TargetStats(None, [str(k) for k in range(n_groups)], normalize, [1] * n_groups,
                       tokens=TargetTokens(tokens, weights))


def reference(vm, n_targets: int, tokens_per_target: int):
    """A pairwise reference of ``n_targets`` rows of ``tokens_per_target`` valued tokens."""
    from forvalue_ray.engine import Reference

    tokens = random_tokens(vm, n_targets * tokens_per_target, n_targets)
    return Reference(tokens, [str(i) for i in range(n_targets)],
                     torch.ones(n_targets, dtype=torch.float64, device=vm.device))
