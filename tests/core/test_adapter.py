"""A PEFT/LoRA adapter loaded with ``load_model(..., adapter=)`` is merged into the weights the valuation reads:
the scores equal those of the same adapter merged in memory, differ from the base model's, and the adapter is
part of the provenance and the fingerprint (artifacts of base and adapted models never mix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import forvalue_ray
from forvalue_ray import from_hf, load_model, value_scores
from forvalue_ray.model import _dir_digest, adapter_provenance
from forvalue_ray.testing.tiny import char_tokenizer, tiny_model

peft = pytest.importorskip("peft")

TRAIN = [{"text": "the cat sat on the mat"}, {"prompt": "Q: 2+2?", "response": " A: 4"}, {"text": "zebra!"},
         {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
TARGET = [{"text": "a cat on a mat"}, {"prompt": "Q: 3+3?", "response": " A: 6"}, {"text": "no"}]
TARGETS = ["q_proj", "v_proj", "lm_head"]


def rel_err(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b))


def make_adapter(model_dir, adapter_dir, seed: int):
    """A LoRA adapter on an independent copy of the saved base, with non-zero B (zero at init: a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=True)
    pm = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    touched = set()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
                touched.add(next(t for t in TARGETS if f".{t}." in name))
    assert touched == set(TARGETS)  # the head itself is adapted, not only attention
    pm.save_pretrained(adapter_dir)
    return pm


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    model_dir, adapter_dir, other_dir = root / "base", root / "lora", root / "lora2"
    vm = tiny_model("llama", dtype=torch.float32)
    vm.model.save_pretrained(model_dir)
    vm.tokenizer.save_pretrained(model_dir)
    merged = make_adapter(model_dir, adapter_dir, seed=1).merge_and_unload()
    make_adapter(model_dir, other_dir, seed=2)
    return model_dir, adapter_dir, other_dir, merged


def test_adapter_is_merged_into_the_valued_weights(dirs):
    model_dir, adapter_dir, _, merged = dirs
    vm = load_model(str(model_dir), adapter=str(adapter_dir))
    assert vm.dtype == torch.float32
    ref = from_hf(merged, char_tokenizer())
    assert torch.equal(vm.head.weight, ref.head.weight)  # the LoRA'd lm_head is what the readout uses
    got, want = value_scores(vm, TRAIN, TARGET), value_scores(ref, TRAIN, TARGET)
    assert rel_err(got, want) < 1e-5

    base = load_model(str(model_dir))
    assert not torch.equal(base.head.weight, vm.head.weight)
    assert rel_err(value_scores(base, TRAIN, TARGET), want) > 1e-2


def test_adapter_provenance_and_fingerprint(dirs):
    model_dir, adapter_dir, other_dir, _ = dirs
    vm = load_model(str(model_dir), adapter=str(adapter_dir))
    base = load_model(str(model_dir))
    assert vm.provenance["adapter"] == str(adapter_dir)
    digest = vm.provenance["adapter_sha256"]
    assert isinstance(digest, str) and len(digest) == 24 and int(digest, 16) >= 0
    assert digest == _dir_digest(adapter_dir)
    assert "adapter" not in base.provenance and "adapter_sha256" not in base.provenance
    assert vm.provenance["weights_digest"] == base.provenance["weights_digest"]  # same base weights
    assert vm.fingerprint() != base.fingerprint()
    assert vm.fingerprint() == load_model(str(model_dir), adapter=str(adapter_dir)).fingerprint()  # stable

    # another adapter's digest (and so fingerprint) differs, even if it were saved under the same path
    other = adapter_provenance(str(other_dir))
    assert other["adapter_sha256"] != digest
    assert forvalue_ray.model.model_fingerprint({**vm.provenance, "adapter_sha256": other["adapter_sha256"]}) \
        != vm.fingerprint()
