"""Image-text rows: the autograd oracle, per-row response masks, batch invariance, bad images."""

import numpy as np
import pytest
import torch

from forvalue_ray import RowError, encode_rows, from_hf, pairwise_scores, value_scores
from forvalue_ray.engine import Scorer
from forvalue_ray.vision import collate_vision
from forvalue_ray.testing.tiny_vlm import image_bytes, tiny_idefics3, tiny_qwen2_vl

RED, BLUE = image_bytes((255, 0, 0), shape="circle"), image_bytes((0, 0, 255), shape="square")
GREEN = image_bytes((0, 200, 0), shape="triangle", size=(80, 40))
TRAIN = [
    {"images": [RED], "prompt": "What is it?", "response": "a red circle"},
    {"images": [BLUE, GREEN], "prompt": "Describe both.", "response": "blue square, green triangle"},
    {"images": [{"bytes": GREEN, "path": None}],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "shape?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "triangle"}]},
                  {"role": "user", "content": [{"type": "text", "text": "colour?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "green"}]}]},
    {"prompt": "no image here:", "response": " just text"},
]
TARGET = [{"images": [RED], "prompt": "What is it?", "response": "red"},
          {"images": [BLUE], "prompt": "Name the colour.", "response": "blue"}]

FAMILIES = {"qwen2_vl": tiny_qwen2_vl, "idefics3": tiny_idefics3}


@pytest.fixture(scope="module", params=list(FAMILIES))
def vm(request):
    model, processor = FAMILIES[request.param]()
    return from_hf(model.eval(), processor, source=f"tiny-{request.param}")


def oracle_gradients(vm, rows):
    """∇_W Σ_valued log p(y) per row, W a detached leaf copy of the LM head swapped into the model's forward."""
    model = vm.model
    name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings()) + ".weight"
    grads = []
    for r in encode_rows(vm, rows):
        w = model.get_output_embeddings().weight.detach().clone().requires_grad_(True)
        ids = torch.as_tensor(r.input_ids)[None]
        extra = collate_vision([r.vision], len(r.input_ids)) if r.vision else {}
        extra = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in extra.items()}
        logits = torch.func.functional_call(model, {name: w}, args=(), kwargs=dict(
            input_ids=ids, attention_mask=torch.ones_like(ids), **extra), tie_weights=False).logits[0]
        labels = torch.as_tensor(r.labels)[1:]
        keep = labels != -100
        ll = torch.log_softmax(logits[:-1].double(), -1)[keep].gather(1, labels[keep][:, None]).sum()
        grads.append(torch.autograd.grad(ll, w)[0].reshape(-1))
    return torch.stack(grads)


def test_image_rows_match_autograd(vm):
    gt, gs = oracle_gradients(vm, TRAIN), oracle_gradients(vm, TARGET)
    exact = (gt @ gs.T).numpy()
    np.testing.assert_allclose(pairwise_scores(vm, TRAIN, TARGET, vocab_chunk=50), exact, rtol=1e-6,
                               atol=1e-9 * np.abs(exact).max())
    np.testing.assert_allclose(value_scores(vm, TRAIN, TARGET), exact.mean(1), rtol=1e-6,
                               atol=1e-9 * np.abs(exact).max())


def test_only_response_tokens_are_valued(vm):
    tok = vm.tokenizer

    def text_of(ids):  # the char tokenizer's decode would space out characters
        return "".join(tok.convert_ids_to_tokens([int(i) for i in ids]))
    for row, valued_text in ((TRAIN[0], "a red circle"), (TRAIN[2], "triangle"), (TRAIN[1], "blue square")):
        enc = encode_rows(vm, [row])[0]
        valued = text_of(enc.input_ids[enc.labels != -100])
        assert valued_text in valued
        assert "?" not in valued and "Describe" not in valued  # no prompt text
        image_ids = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<image>") if t in tok.get_vocab()}
        assert not image_ids & set(enc.labels[enc.labels != -100].tolist())
    multi = encode_rows(vm, [TRAIN[2]])[0]
    both = text_of(multi.input_ids[multi.labels != -100])
    assert "triangle" in both and "green" in both and "colour" not in both


def test_score_independent_of_batch_mates_and_their_images(vm):
    rows = encode_rows(vm, TRAIN)
    scorer = Scorer(vm, sketch_dim=64)
    together = scorer(rows)
    for i, r in enumerate(rows):
        alone = scorer([r])
        np.testing.assert_allclose(alone["sketch"][0], together["sketch"][i], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(alone["nll"][0], together["nll"][i], rtol=1e-9)
    # the same row beside rows with more images, forced into one batch
    crowd = Scorer(vm, sketch_dim=64, max_tokens=10**6)([rows[0], rows[1], rows[1], rows[2]])
    np.testing.assert_allclose(crowd["sketch"][0], together["sketch"][0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("images, reason", [
    ([b"\x89PNG\r\n not really a png"], "corrupt image"),
    (["/nonexistent/cat.png"], "could not be read"),
    ([b""], "an image must be"),
    ([12], "an image must be"),
])
def test_bad_images_are_row_errors(vm, images, reason):
    with pytest.raises(RowError, match=reason):
        encode_rows(vm, [{"images": images, "prompt": "p", "response": "r"}])


def test_oversized_image_is_rejected(vm):
    from forvalue_ray.vision import VisionEncoder

    enc = VisionEncoder(vm.processor, max_image_pixels=100)
    with pytest.raises(RowError, match="over 100 pixels"):
        enc({"images": [RED], "prompt": "p", "response": "r"})


def test_placeholder_count_must_match_images(vm):
    row = {"images": [RED, BLUE], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "y"}]}]}
    with pytest.raises(RowError, match="placeholders"):
        encode_rows(vm, [row])


ASSISTANT_FIRST = {"images": [RED], "messages": [
    {"role": "assistant", "content": [{"type": "text", "text": "I see a red circle"}]},
    {"role": "user", "content": [{"type": "text", "text": "sure?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]}


def test_assistant_first_conversation_is_valued(vm):
    """The images go into the assistant's first turn; only its text (and the later reply) is valued."""
    tok = vm.tokenizer
    enc = encode_rows(vm, [ASSISTANT_FIRST])[0]
    valued = "".join(tok.convert_ids_to_tokens([int(i) for i in enc.input_ids[enc.labels != -100]]))
    assert valued.startswith("I see a red circle") and "yes" in valued and "sure" not in valued
    image_ids = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<image>") if t in tok.get_vocab()}
    assert not image_ids & set(enc.labels[enc.labels != -100].tolist())
    exact = (oracle_gradients(vm, [ASSISTANT_FIRST]) @ oracle_gradients(vm, TARGET).T).numpy()
    np.testing.assert_allclose(pairwise_scores(vm, [ASSISTANT_FIRST], TARGET), exact, rtol=1e-6,
                               atol=1e-9 * np.abs(exact).max())
