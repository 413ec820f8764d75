"""Exact for every model the loader accepts, bounded on long rows, the same bytes however it runs.

References: the autograd oracle through each model's own forward (forvalue_ray/testing/tiny.py), dense full-vocabulary
computations written out here, and a second code path of the readout (Gram vs explicit norms).
"""

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from forvalue_ray import encode_rows, from_hf, pairwise_scores, sketches, value_scores
from forvalue_ray.engine import Scorer
from forvalue_ray.model import model_fingerprint
from forvalue_ray.readout import LMHead, TargetStatDot, block_sizes, gradient_sq_norms, vocab_pass
from forvalue_ray.testing.tiny import char_tokenizer, oracle_gradients, tiny_model

TRAIN = [{"text": "the cat sat on the mat"}, {"prompt": "Q: 2+2?", "response": " A: 4"}, {"text": "zebra!"}]
TARGET = [{"text": "a cat on a mat"}, {"prompt": "Q: 3+3?", "response": " A: 6"}]


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


# ---- the load-time guard ----------------------------------------------------------------------------------------


class UnmodelledScaling(LlamaForCausalLM):
    """A head the readout does not model: the forward multiplies its logits by 1.5."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out


def test_guard_refuses_a_head_it_does_not_model():
    vm = tiny_model("llama", dtype=torch.float32)
    odd = UnmodelledScaling(vm.model.config).to(torch.float32)
    odd.load_state_dict(vm.model.state_dict())
    with pytest.raises(ValueError, match=r"UnmodelledScaling.*family 'llama'.*relative mismatch 0\.33"):
        from_hf(odd.eval(), char_tokenizer())


@pytest.mark.parametrize("family", ["granite", "hyperclovax", "cohere", "falcon_h1", "gemma2", "phi"])
def test_guard_accepts_every_modelled_transform(family):
    vm = tiny_model(family)
    assert vm.head_mismatch < 1e-12  # fp64: the readout's logits are the model's
    assert (vm.head.scale != 1.0 or vm.head.softcap is not None or
            vm.head.weight.shape[1] == vm.model.config.hidden_size + 1)  # each family transforms its logits


# ---- a chunk of only −inf logits ----------------------------------------------------------------------------------


def test_masked_first_vocab_chunk_gives_exact_finite_values():
    """A head bias of −inf over the whole first chunk (masked ids): the online log-sum-exp starts from −inf
    and must not produce NaN. Reference: the dense full-vocabulary computation."""
    torch.manual_seed(0)
    vocab, d, n, chunk = 50, 6, 7, 16
    w = torch.randn(vocab, d, dtype=torch.float64)
    bias = torch.randn(vocab, dtype=torch.float64)
    bias[:chunk] = -torch.inf
    head = LMHead(torch.cat([w, bias[:, None]], 1))
    h = torch.cat([torch.randn(n, d, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1)
    y = torch.randint(chunk, vocab, (n,))
    stats = torch.randn(1, vocab, d + 1, dtype=torch.float64)
    res = vocab_pass(head, h, y, [TargetStatDot(stats, n, torch.float64)], chunk)
    z = h @ head.weight.T
    p = torch.softmax(z, -1)
    alpha = torch.nn.functional.one_hot(y, vocab).double() - p
    expected = (alpha * (h @ stats[0].T)).sum(1)
    assert torch.isfinite(res.values[0]).all() and torch.isfinite(res.lse).all()
    torch.testing.assert_close(res.values[0][:, 0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.lse, torch.logsumexp(z, -1), rtol=1e-12, atol=1e-12)


# ---- long rows in bounded memory ------------------------------------------------------------------------------------


def test_block_sizes_bound_every_intermediate():
    budget = 1 << 20
    for k, s, dim in [(0, 0, 0), (8, 0, 0), (0, 25_600, 0), (0, 0, 16_384), (64, 30_000, 16_384)]:
        block, chunk = block_sizes(8192, n_groups=k, n_reference=s, sketch_dim=dim, budget=budget)
        assert block * chunk * max(1, k) <= budget and s * chunk <= budget
        assert block * max(s, dim) <= budget or block == 1


@pytest.fixture(scope="module")
def long_vm():
    return tiny_model("llama", seed=1, max_position_embeddings=4096)


def test_long_row_norms_gram_equals_explicit(long_vm):
    """One 1500-token row and three short ones: the Gram and the explicit form of ‖G‖² agree, and tiny
    budgets (many token blocks, small chunks) change nothing."""
    vm = long_vm
    rows = encode_rows(vm, [{"text": ("long row of text " * 100)[:1500]}, *TRAIN])
    from forvalue_ray.engine import log_sum_exp, valued_tokens

    vt = valued_tokens(vm, rows)
    lse = log_sum_exp(vm, vt, 64)
    big = gradient_sq_norms(vm.head, vt.h, vt.y, lse, vt.seg, vt.n_rows, budget=1 << 40)  # every row: Gram
    small = gradient_sq_norms(vm.head, vt.h, vt.y, lse, vt.seg, vt.n_rows, chunk=37, budget=3000)  # explicit
    torch.testing.assert_close(small, big, rtol=1e-10, atol=0)


def test_long_row_scores_match_autograd(long_vm):
    vm = long_vm
    train = [{"text": ("long row of text " * 100)[:1500]}, *TRAIN]
    enc = encode_rows(vm, train)
    assert len(enc[0].input_ids) == 1501
    gt, gs = oracle_gradients(vm, enc), oracle_gradients(vm, encode_rows(vm, TARGET))
    for normalize in (False, True):
        a, b = (gt / gt.norm(dim=1, keepdim=True), gs / gs.norm(dim=1, keepdim=True)) if normalize else (gt, gs)
        exact = (a @ b.T).numpy()
        # an fp64 model computes in fp64 end to end (Ḡ, rotary cos/sin, the attention's softmax): fp64 rounding,
        # whatever the batch's padding or the CPU's vector width
        assert rel_err(pairwise_scores(vm, train, TARGET, normalize=normalize, vocab_chunk=48), exact) < 1e-12
        assert rel_err(value_scores(vm, train, TARGET, normalize=normalize), exact.mean(1)) < 1e-12


def test_default_truncation_follows_the_context_length(long_vm):
    vm = tiny_model("llama")  # max_position_embeddings 256
    enc = encode_rows(vm, [{"text": "x" * 300}])[0]
    assert len(enc.input_ids) == 256 and enc.truncated == 301 - 256
    assert len(encode_rows(long_vm, [{"text": "x" * 300}])[0].input_ids) == 301


# ---- the same bytes, whatever the execution ---------------------------------------------------------------------------


def test_sketch_scatter_adds_run_deterministic(monkeypatch):
    """index_add_ is atomic on CUDA: every scatter-add of the readout and the sketch runs with deterministic
    algorithms on, and the global setting is restored afterwards."""
    vm = tiny_model("llama", dtype=torch.float32)
    seen, original = [], torch.Tensor.index_add_

    def spy(self, *args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_add_", spy)
    before = torch.are_deterministic_algorithms_enabled()
    Scorer(vm, sketch_dim=64, sketch_seed=0)(encode_rows(vm, TRAIN))
    assert seen and all(seen)
    assert torch.are_deterministic_algorithms_enabled() == before


def test_dtype_is_part_of_the_model_fingerprint():
    vm = tiny_model("llama", dtype=torch.float32)
    bf16 = from_hf(tiny_model("llama", dtype=torch.float32).model.to(torch.bfloat16), vm.tokenizer,
                   weights_digest=vm.provenance["weights_digest"])
    assert bf16.provenance["dtype"] == "bfloat16" and vm.provenance["dtype"] == "float32"
    assert bf16.fingerprint() != vm.fingerprint()
    assert model_fingerprint({**vm.provenance}) == vm.fingerprint()


def test_sketch_of_biased_head_is_unbiased_for_weight_and_bias():
    """The sketch covers ∂/∂b too: its mean over seeds approaches the autograd inner product over weight and bias."""
    vm = tiny_model("phi")
    gt = oracle_gradients(vm, encode_rows(vm, TRAIN[:1]))
    gs = oracle_gradients(vm, encode_rows(vm, TARGET[:1]))
    exact = float(gt[0] @ gs[0])
    est = [float(sketches(vm, TRAIN[:1], dim=256, seed=s)[0] @ sketches(vm, TARGET[:1], dim=256, seed=s)[0])
           for s in range(60)]
    assert abs(np.mean(est) - exact) < 5 * np.std(est) / np.sqrt(len(est))
