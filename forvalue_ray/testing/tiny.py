"""Tiny random models and a character tokenizer built in code: no downloads, seconds to build."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from ..model import from_hf

CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


VOCAB = 160  # > len(SPECIALS + CHARS) so some ids never appear; not a multiple of the test chunk size
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    # soft-capping + tied embeddings + a head_dim different from hidden/heads
    "gemma2": dict(model_type="gemma2", head_dim=16, final_logit_softcapping=3.0, attn_logit_softcapping=50.0,
                   tie_word_embeddings=True, query_pre_attn_scalar=16),
    # logits divided by a scaling factor
    "granite": dict(model_type="granite", logits_scaling=2.5, tie_word_embeddings=False),
    # logits multiplied by a scaling factor (same config key as Granite, the opposite operation)
    "hyperclovax": dict(model_type="hyperclovax", logits_scaling=0.25, tie_word_embeddings=False),
    # logits multiplied by logit_scale
    "cohere": dict(model_type="cohere", logit_scale=0.5, tie_word_embeddings=True),
    # logits multiplied by the model's lm_head_multiplier (a hybrid attention + Mamba-2 model)
    "falcon_h1": dict(model_type="falcon_h1", lm_head_multiplier=0.25, tie_word_embeddings=False, head_dim=8,
                      mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1,
                      mamba_chunk_size=16),
    # a head with its own bias (∂/∂b is part of the gradient)
    "phi": dict(model_type="phi", tie_word_embeddings=False),
}


def tiny_model(family: str, dtype=torch.float64, seed: int = 0, head_bias: bool = False, **config):
    from transformers import AutoConfig

    cfg = dict(CONFIGS[family])
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **{**COMMON, **cfg, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    with torch.no_grad():  # random init is tiny; widen the logit spread so the softmax is not flat
        model.get_output_embeddings().weight.mul_(30.0)
    if head_bias:
        old = model.lm_head
        model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=dtype)
        with torch.no_grad():
            model.lm_head.weight.copy_(old.weight)
            model.lm_head.bias.normal_(0, 1.0)
    return from_hf(model.eval(), char_tokenizer(), source=f"tiny-{family}-{seed}")


def oracle_gradients(vm, encoded) -> torch.Tensor:
    """Autograd reference: the gradient of Σ_valued log softmax(logits)[y] for each row with respect to the
    LM head's weight and, when it has one, its bias — detached leaf copies swapped into the model's own
    forward (its own scaling, multipliers and soft-capping), flattened and concatenated."""
    model = vm.model
    # the head's own name: for tied models named_parameters() would report the input embedding instead
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    grads = []
    for r in encoded:
        leaves = {f"{name}.{k}": p.detach().clone().requires_grad_(True)
                  for k, p in (("weight", head.weight), ("bias", head.bias)) if p is not None}
        ids = torch.as_tensor(r.input_ids)[None]
        logits = torch.func.functional_call(model, leaves, (ids,), tie_weights=False).logits[0]
        labels = torch.as_tensor(r.labels)[1:]
        logp = torch.log_softmax(logits[:-1].double(), -1)
        keep = labels != -100
        ll = logp[keep].gather(1, labels[keep][:, None]).sum()
        g = torch.autograd.grad(ll, list(leaves.values()))
        grads.append(torch.cat([x.detach().reshape(-1).double() for x in g]))
    return torch.stack(grads)
