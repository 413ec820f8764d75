"""FLOPs per valued token of every path, split by the precision each product runs in, and a roofline estimate
for one H200 — counted through the engine's own code on meta tensors (no weights, no GPU).

    python benchmarks/bench_flops.py [--seq 1024] [--batch-tokens 4096] [--out benchmarks/results/flops.json]
    python benchmarks/bench_flops.py --tiny --out /tmp/flops_tiny.json     # seconds: the same code on tiny shapes
    python benchmarks/bench_flops.py --report [--out FILE]                 # the table of a saved run

Each (shape, path) builds the real model class from its config on the meta device and runs the product's code
— a :class:`~forvalue_ray.engine.Scorer` over one batch of rows, or the model's own forward with logits — under
``torch.utils.flop_counter.FlopCounterMode`` and :class:`OpCosts`, which attributes every counted product to its
operands' dtype (FlopCounterMode's own formulas, so the totals must agree) and every kernel to the bytes it
moves. Integer tensors (ids, masks, positions, row indices, image grids) keep real values
(:class:`MetaWithIntegers`) so the model's and the engine's data-dependent steps run as they do on real data.

Roofline (an estimate, not a measurement): eager PyTorch, one kernel per op, each reads its inputs and writes its
outputs once from HBM; time per kernel = max(FLOPs / peak of its precision, bytes / HBM bandwidth); no launch
overhead, no overlap. Attention is the fused flash kernel a GPU runs (counted, like FlopCounterMode does, as
full L×L: causal kernels skip about half of it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402

aten = torch.ops.aten
META, CPU = torch.device("meta"), torch.device("cpu")

# one H200 SXM (dense, no sparsity): the roofline's ceilings
PEAK_FLOPS = {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12, "fp64": 67e12}
HBM_BYTES_PER_S = 4.8e12
PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
             torch.complex64: "fp32", torch.complex128: "fp64"}
TENSOR_CORE = ("bf16", "fp16")  # 16-bit inputs, fp32 accumulation

TARGET_TOKENS = 4096  # valued tokens of the target set for mean/groups (16 rows × 256): decides the form
N_GROUPS = 8
PAIRWISE = (100, 256)  # targets × valued tokens each
SKETCH_DIM = 16384
PATHS = {
    "forward": "plain forward with logits (+ fp32 log-softmax)",
    "value_mean": "value, mean mode, dense Ḡ",
    "value_mean_factored": f"value, mean mode, factored Ḡ (S = {TARGET_TOKENS} target tokens)",
    "groups_8": f"value, groups K = {N_GROUPS}, dense Ḡ",
    "groups_8_factored": f"value, groups K = {N_GROUPS}, factored Ḡ (S = {TARGET_TOKENS})",
    "pairwise": f"pairwise, {PAIRWISE[0]} targets × {PAIRWISE[1]} tokens",
    "sketch": f"sketch, dim {SKETCH_DIM}",
    "cosine": "value, mean mode, cosine (dense Ḡ + ‖G‖)",
}


def _device(kwargs):
    d = kwargs.get("device")
    return None if d is None else torch.device(d)


def _written(func) -> list[int]:
    return [i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


class MetaWithIntegers(TorchDispatchMode):
    """Meta-device execution in which integer and boolean tensors keep real values, computed on the CPU.

    Floating-point tensors are shapes only; integer ones (token ids, masks, positions, labels, row indices,
    image grids) are small and are what model code and the engine branch on. An op whose tensor inputs all
    have values is computed for real and returns a meta tensor carrying the result; anything else runs on
    meta. Reading an unknown floating-point value on the host gives zeros (``.cpu()``, ``.item()``) and
    ``torch.equal`` compares shapes: only the model check at load time does either. Unknown boolean masks
    select every element."""

    def __init__(self):
        super().__init__()
        self.real = WeakIdKeyDictionary()

    def __enter__(self):
        import torch.fx.experimental._config as fx_config

        self._assume = fx_config.meta_nonzero_assume_all_nonzero
        fx_config.meta_nonzero_assume_all_nonzero = True
        return super().__enter__()

    def __exit__(self, *exc):
        import torch.fx.experimental._config as fx_config

        fx_config.meta_nonzero_assume_all_nonzero = self._assume
        return super().__exit__(*exc)

    def known(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" or t in self.real

    def _value(self, x):
        if isinstance(x, torch.Tensor):
            return self.real[x] if x.device.type == "meta" else x
        return CPU if isinstance(x, torch.device) and x == META else x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        metas = [t for t in tensors if t.device.type == "meta"]
        if func is aten._to_copy.default and metas and _device(kwargs) == CPU:  # .cpu(), .tolist(), .numpy()
            src = args[0]
            if src in self.real:
                return func(self.real[src], **kwargs)
            return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        if func is aten._local_scalar_dense.default:
            return self.real[args[0]].item() if args[0] in self.real else 0
        if func is aten.equal.default and not all(map(self.known, tensors)):
            return args[0].shape == args[1].shape
        if func is aten._to_copy.default and not metas and _device(kwargs) == META:
            out = func(*args, **kwargs)
            if not args[0].is_floating_point():
                self.real[out] = func(args[0], **{**kwargs, "device": CPU})
            return out
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        factory = not tensors and _device(kwargs) == META and not (dtype.is_floating_point or dtype.is_complex)
        if factory or (metas and all(map(self.known, tensors))):
            real_args, real_kwargs = tree_unflatten([self._value(x) for x in flat], spec)
            out = func(*real_args, **real_kwargs)
            written = _written(func)

            def twin(r):
                if not isinstance(r, torch.Tensor):
                    return r
                for i in written:  # an in-place op returns its (meta) argument
                    if i < len(real_args) and r is real_args[i]:
                        return args[i]
                m = torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=META)
                self.real[m] = r
                return m

            return tree_map(twin, out)
        for i in _written(func):  # a tensor with values overwritten by unknown ones
            if i < len(args) and isinstance(args[i], torch.Tensor):
                self.real.pop(args[i], None)
        return func(*args, **kwargs)


class HostConstants(TorchFunctionMode):
    """``torch.tensor(data, device="meta")`` creates its tensor without a dispatched op (and reads tensors in
    ``data`` past the dispatcher); built on the CPU and copied instead, it keeps its values under
    :class:`MetaWithIntegers`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor and kwargs.get("device") is not None and torch.device(kwargs["device"]) == META:
            data = tree_map(lambda x: x.tolist() if isinstance(x, torch.Tensor) else x, args)  # meta scalars too
            return func(*data, **{**kwargs, "device": CPU}).to(META)
        return func(*args, **kwargs)


class FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention as the single fused (flash) kernel a GPU runs: on the meta device PyTorch
    would take its math fallback, whose L×L intermediates a GPU never writes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        if k.shape[-3] != q.shape[-3]:  # grouped-query attention: the kernel reads each K/V head once per group
            k, v = (x.repeat_interleave(q.shape[-3] // x.shape[-3], dim=-3) for x in (k, v))
        return aten._scaled_dot_product_flash_attention(q, k, v, is_causal=kwargs.get("is_causal", False),
                                                        scale=kwargs.get("scale"))[0]


VIEWS_AND_METADATA = {aten.empty.memory_format, aten.empty_strided.default, aten.lift_fresh.default,
                      aten.detach.default}
GATHERS = {aten.index.Tensor, aten.embedding.default, aten.gather.default, aten.index_select.default}
SCATTERS = {aten.index_add.default, aten.index_add_.default, aten.index_put.default, aten.index_put_.default,
            aten.scatter_add.default, aten.scatter_add_.default, aten._index_put_impl_.default}
FFTS = {aten._fft_r2c.default: 2.5, aten._fft_c2r.default: 2.5, aten._fft_c2c.default: 5.0}


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a strided tensor addresses (broadcast dimensions read once)."""
    return t.element_size() * math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)


class OpCosts(TorchDispatchMode):
    """Every device kernel of a run: phase, kind (matmul / fft / memory), precision, FLOPs, HBM bytes."""

    def __init__(self):
        super().__init__()
        self.ops, self.phase = [], "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out

    def record(self, func, args, kwargs, out):
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        outputs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        on_device = any(t.device.type == "meta" for t in inputs + outputs)
        transfer = func is aten._to_copy.default and _device(kwargs) not in (None, inputs[0].device)
        if not on_device or transfer or func.is_view or func in VIEWS_AND_METADATA:
            return
        packet, flops, kind = func.overloadpacket, 0, "memory"
        if packet in flop_registry:
            flops, kind = flop_registry[packet](*args, **kwargs, out_val=out), "matmul"
        elif func in FFTS:  # c·n·log2(n) per transform of length n (c = 2.5 real, 5 complex)
            signal = outputs[0] if func is aten._fft_c2r.default else inputs[0]
            n = math.prod(signal.shape[d] for d in args[1])
            flops, kind = FFTS[func] * signal.numel() * math.log2(max(n, 2)), "fft"
        if func in GATHERS:  # reads only the gathered elements
            nbytes = sum(distinct_bytes(t) for t in inputs[1:]) + 2 * sum(distinct_bytes(o) for o in outputs)
        elif func in SCATTERS:  # read-modify-write of the updated elements only
            nbytes = sum(distinct_bytes(t) for t in inputs[1:]) + 2 * distinct_bytes(inputs[-1])
        else:
            seen = {id(t): t for t in inputs}
            nbytes = sum(distinct_bytes(t) for t in seen.values()) + sum(distinct_bytes(o) for o in outputs)
        dtype = inputs[0].dtype if inputs else outputs[0].dtype
        self.ops.append((self.phase, kind, PRECISION.get(dtype, "int"), flops, nbytes))

    def seconds(self, op) -> float:
        _, kind, precision, flops, nbytes = op
        compute = flops / PEAK_FLOPS[precision] if flops else 0.0
        return max(compute, nbytes / HBM_BYTES_PER_S)


@contextlib.contextmanager
def fp32_products():
    """The readout's large products in fp32 whatever the model's dtype: how they ran before they were moved to
    the model's dtype (the comparison point for the FLOP split and the accuracy of 16-bit products)."""
    from forvalue_ray import engine, readout

    saved = readout.product_dtype
    engine.product_dtype = readout.product_dtype = readout.accumulation_dtype
    try:
        yield
    finally:
        engine.product_dtype = readout.product_dtype = saved


def _inputs_on(vm, rows):
    """The model's own forward inputs for a batch of equal-length rows (ids, mask, image tensors)."""
    from forvalue_ray.vision import collate_vision

    ids = torch.as_tensor(np.stack([r.input_ids for r in rows]))
    extra = collate_vision([r.vision for r in rows], ids.shape[1]) if rows[0].vision else {}
    extra = {k: v.to(vm.device, vm.dtype if v.is_floating_point() else v.dtype) for k, v in extra.items()}
    return dict(input_ids=ids.to(vm.device), attention_mask=torch.ones_like(ids).to(vm.device), use_cache=False,
                **extra)


def prepare(path: str, vm, rows, batch_tokens: int):
    """The work of one path as a callable (its set-up — statistics cast, α' materialised — done here)."""
    from forvalue_ray.engine import Scorer

    if path == "forward":
        def run():
            logits = vm.model(**_inputs_on(vm, rows)).logits
            torch.log_softmax(logits.float(), -1)
        return run
    kw = {"max_tokens": batch_tokens}
    if path in ("value_mean", "cosine"):
        kw.update(stats=shapes.dense_stats(vm, 1, normalize=path == "cosine"), normalize=path == "cosine")
    elif path == "groups_8":
        kw["stats"] = shapes.dense_stats(vm, N_GROUPS)
    elif path.endswith("_factored"):
        kw["stats"] = shapes.factored_stats(vm, 1 if path.startswith("value") else N_GROUPS, TARGET_TOKENS)
    elif path == "pairwise":
        kw["reference"] = shapes.reference(vm, *PAIRWISE)
    elif path == "sketch":
        kw["sketch_dim"] = SKETCH_DIM
    scorer = Scorer(vm, **kw)
    return lambda: scorer(rows)


def count(name: str, shape: dict, paths: list[str], seq: int, batch_tokens: int) -> list[dict]:
    """FLOPs by precision, bytes and roofline time of one batch of each path, per valued token (the model is
    built once per shape)."""
    from forvalue_ray.model import ValuationModel

    out = []
    with MetaWithIntegers(), HostConstants():
        model = shapes.build_model(shape, META)
        vm = ValuationModel(model, None, {"source": f"{name} (meta)"})
        row_len = seq if not shapes.is_vision(shape) else len(shapes.make_rows(shape, model.config, seq, 1)[0].input_ids)
        rows = shapes.make_rows(shape, model.config, seq, max(1, batch_tokens // row_len))
        forward = vm.hidden_states
        for path in paths:
            run = prepare(path, vm, rows, batch_tokens)
            costs = OpCosts()

            def hidden_states(*a, **k):  # the readout's ops are everything outside the model's forward
                costs.phase = "forward"
                try:
                    return forward(*a, **k)
                finally:
                    costs.phase = "readout"

            vm.hidden_states = hidden_states
            with FusedAttention(), FlopCounterMode(display=False) as counter, costs, torch.no_grad():
                run()
            out.append({"shape": name, "path": path, "rows": len(rows),
                        **summarise(costs, counter, sum(r.n_valued for r in rows))})
    return out


def summarise(costs: OpCosts, counter: FlopCounterMode, valued: int) -> dict:
    matmul = {}
    for phase, kind, precision, flops, _ in costs.ops:
        if kind == "matmul":
            matmul[precision] = matmul.get(precision, 0) + flops
    total_matmul = sum(matmul.values())
    assert total_matmul == counter.get_total_flops(), (total_matmul, counter.get_total_flops())
    fft = sum(op[3] for op in costs.ops if op[1] == "fft")
    by_phase = {}
    for op in costs.ops:
        key = f"{op[0]}_{'matmul' if op[1] == 'matmul' else 'other'}"
        by_phase[key] = by_phase.get(key, 0) + op[4]
    seconds = sum(costs.seconds(op) for op in costs.ops)
    compute_bound = sum(costs.seconds(op) for op in costs.ops if op[3] and costs.seconds(op) * HBM_BYTES_PER_S > op[4])
    tensor_core = sum(v for k, v in matmul.items() if k in TENSOR_CORE)
    return {
        "valued_tokens": valued,
        "gflop_per_token": {**{f"matmul_{k}": v / valued / 1e9 for k, v in sorted(matmul.items())},
                            "fft_fp32": fft / valued / 1e9},
        "gflop_per_token_total": (total_matmul + fft) / valued / 1e9,
        "tensor_core_fraction": tensor_core / total_matmul,
        "bytes_per_token": {k: v / valued for k, v in sorted(by_phase.items())},
        "estimate_us_per_token": seconds / valued * 1e6,
        "estimate_compute_bound_share": compute_bound / seconds,
        "estimate_tokens_per_s": valued / seconds,
        "estimate_gpu_hours_per_1e9_tokens": 1e9 * seconds / valued / 3600,
    }


def padding_fraction(n_rows: int = 4096, max_tokens: int = 16384, seed: int = 0, median: float = 300.0,
                     sigma: float = 1.0) -> dict:
    """Padded share of the forward's tokens under engine.plan_batches for one shard of log-normal row lengths
    (clipped to 20..4096 tokens)."""
    from forvalue_ray.engine import plan_batches

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, n_rows)), 20, 4096).astype(int)
    real = padded = 0
    for batch in plan_batches(list(lengths), max_tokens):
        real += int(lengths[batch].sum())
        padded += len(batch) * int(lengths[batch].max())
    return {"shard_rows": n_rows, "max_tokens": max_tokens, "median": median, "sigma": sigma,
            "mean_length": float(lengths.mean()), "padded_fraction": 1 - real / padded}


def table(results: list[dict]) -> str:
    base = {r["shape"]: r for r in results if r["path"] == "forward"}
    lines = ["| shape | path | GFLOP/token | × forward | tensor-core % | fp32 GFLOP/token | readout non-matmul MB/token "
             "| est. tokens/s | est. time × forward | est. GPU-h / 10⁹ tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["gflop_per_token"]
        lines.append(
            f"| {r['shape']} | {r['path']} | {r['gflop_per_token_total']:.3f} | "
            f"{r['gflop_per_token_total'] / base[r['shape']]['gflop_per_token_total']:.3f} | "
            f"{100 * r['tensor_core_fraction']:.3f} | {f.get('matmul_fp32', 0) + f['fft_fp32']:.4f} | "
            f"{r['bytes_per_token'].get('readout_other', 0) / 1e6:.2f} | {r['estimate_tokens_per_s']:,.0f} | "
            f"{base[r['shape']]['estimate_tokens_per_s'] / r['estimate_tokens_per_s']:.2f} | "
            f"{r['estimate_gpu_hours_per_1e9_tokens']:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=1024, help="tokens per text row (all but the first valued)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward (the job's --batch-tokens)")
    p.add_argument("--shapes", default=",".join(shapes.SHAPES))
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--tiny", action="store_true", help="tiny versions of the shapes (a CPU check of every path)")
    p.add_argument("--fp32-products", action="store_true",
                   help="the readout's products in fp32 (as before they ran in the model's dtype), for comparison")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "flops.json"))
    p.add_argument("--report", action="store_true", help="print the table of an existing --out, count nothing")
    args = p.parse_args()
    if args.report:
        print(table(json.load(open(args.out))["results"]))
        return
    results, t0 = [], time.time()
    for name in args.shapes.split(","):
        shape = shapes.tiny(shapes.SHAPES[name]) if args.tiny else shapes.SHAPES[name]
        with fp32_products() if args.fp32_products else contextlib.nullcontext():
            results += count(name, shape, args.paths.split(","), args.seq, args.batch_tokens)
        for r in results[-len(args.paths.split(",")):]:
            print(f"{name:14s} {r['path']:20s} {r['gflop_per_token_total']:9.4f} GFLOP/token  tensor-core "
                  f"{100 * r['tensor_core_fraction']:7.3f}%  est {r['estimate_tokens_per_s']:12,.0f} tokens/s",
                  flush=True)
    forms = {}
    for name in args.shapes.split(","):
        from forvalue_ray.engine import target_form
        text = shapes.SHAPES[name].get("text_config", shapes.SHAPES[name])
        v, d = text["vocab_size"], text["hidden_size"]
        forms[name] = {"mean": target_form(TARGET_TOKENS, 1, v, d), f"groups_{N_GROUPS}": target_form(
            TARGET_TOKENS, N_GROUPS, v, d), "factored_below_tokens": {k: k * v * d // (v + d) for k in (1, N_GROUPS)}}
    meta = {"command": "python benchmarks/bench_flops.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
            "seq": args.seq, "batch_tokens": args.batch_tokens, "target_tokens": TARGET_TOKENS, "n_groups": N_GROUPS,
            "pairwise": PAIRWISE, "sketch_dim": SKETCH_DIM, "paths": PATHS, "tiny": args.tiny,
            "fp32_products": args.fp32_products,
            "peak_flops_per_s": PEAK_FLOPS, "hbm_bytes_per_s": HBM_BYTES_PER_S, "wall_s": round(time.time() - t0, 1),
            "estimate": "roofline of eager kernels on one H200: not a measurement"}
    padding = [padding_fraction(max_tokens=m, n_rows=n) for m in (4096, 16384) for n in (4096, 512)]
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "forms_chosen": forms, "padding": padding, "results": results}, f, indent=1)
    print(table(results))
    for pad in padding:
        print(f"padding: shard {pad['shard_rows']} rows, {pad['max_tokens']} tokens/batch: "
              f"{100 * pad['padded_fraction']:.2f}% padded (mean length {pad['mean_length']:.0f})")


if __name__ == "__main__":
    main()
