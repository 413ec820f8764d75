"""Tiny random vision-language models (Qwen2-VL, Idefics3/SmolVLM) with processors built in code: no downloads,
about a second each to build. Images are drawn with PIL.

Qwen2-VL (56x56 image, patch 14, merge 2): 16 patches per image -> 4 ``<|image_pad|>`` tokens.
Idefics3 (vision image_size 32, patch 8, scale_factor 2): 16 patches per image -> 4 ``<image>`` tokens.
"""

from __future__ import annotations

import io
import string

import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
WIDEN = 30.0  # random init gives near-flat softmax; widen the LM head like tiny.py does

# --------------------------------------------------------------------------------------------- tokenizers


def _char_tokenizer(specials: list[str], *, unk: str, pad: str, eos: str, bos: str | None = None,
                    chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Character-level tokenizer whose ``specials`` come first (ids 0..) and are matched as single tokens."""
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    # registered as added special tokens: split out of the text before the per-character pre-tokenizer
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    kw = dict(bos_token=bos) if bos is not None else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad, eos_token=eos, **kw)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


# --------------------------------------------------------------------------------------------- Qwen2-VL

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# The Qwen2-VL template without the default system prompt (keeps character-level sequences short).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_VOCAB = 192  # > len(QWEN_SPECIALS + CHARS) == 104, so some ids never appear


def qwen2_vl_tokenizer() -> PreTrainedTokenizerFast:
    return _char_tokenizer(QWEN_SPECIALS, unk="<|endoftext|>", pad="<|endoftext|>", eos="<|im_end|>",
                           chat_template=QWEN_CHAT_TEMPLATE)


def _image_only_qwen2_vl_processor_class():
    """Qwen2VLProcessor minus its video processor. In transformers 5.x the stock class insists on a
    ``VideoProcessorMixin`` for ``video_processor`` (None is rejected too), and that class only exists when
    torchvision is installed, which this project does not depend on. Everything the image path uses
    (``replace_image_token``, ``mm_token_type_ids``, ``__call__``, ``apply_chat_template``) is inherited."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageOnlyProcessor


def tiny_qwen2_vl(dtype=torch.float64, seed: int = 0):
    """(Qwen2VLForConditionalGeneration, processor), random weights, eager attention, eval mode. The processor is a
    Qwen2VLProcessor subclass without a video processor (see _image_only_qwen2_vl_processor_class) whose image
    processor is the PIL backend (no torchvision needed)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = qwen2_vl_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    patch, merge, temporal = 14, 2, 2
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         # head_dim 8 -> 4 rotary frequencies split over (temporal, height, width)
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]),
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=patch,
                           spatial_merge_size=merge, temporal_patch_size=temporal),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="eager")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(WIDEN)
    factor = patch * merge  # images are resized to multiples of 28: 56x56 -> 4x4 patches -> 4 tokens
    image_processor = Qwen2VLImageProcessorPil(min_pixels=factor * factor, max_pixels=56 * 56, patch_size=patch,
                                               merge_size=merge, temporal_patch_size=temporal)
    processor = _image_only_qwen2_vl_processor_class()(image_processor=image_processor, tokenizer=tok,
                                                       chat_template=QWEN_CHAT_TEMPLATE)
    return model.eval(), processor


# --------------------------------------------------------------------------------------------- Idefics3

IDEFICS3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
                     "<global-img>", "<end_of_utterance>"]
IDEFICS3_NEEDED = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]

# SmolVLM's chat template, plus plain-string content (SmolVLM's own renders string content as nothing)
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

IDEFICS3_VOCAB = 176  # > len(IDEFICS3_SPECIALS + CHARS) == 103


def idefics3_tokenizer() -> PreTrainedTokenizerFast:
    return _char_tokenizer(IDEFICS3_SPECIALS, unk="<|endoftext|>", pad="<|endoftext|>", eos="<end_of_utterance>",
                           bos="<|im_start|>", chat_template=IDEFICS3_CHAT_TEMPLATE)


def tiny_idefics3(dtype=torch.float64, seed: int = 0, text_config=None, tokenizer=None, widen: float | None = None,
                  chat_template: str | None = None):
    """(Idefics3ForConditionalGeneration, Idefics3Processor), random weights, eager attention, eval mode.

    ``text_config`` (a LlamaConfig, e.g. SmolLM2-135M's) replaces the tiny text config; ``tokenizer`` replaces the
    character tokenizer: the image special tokens are added to it when missing and the token embeddings are resized
    when it outgrows ``text_config.vocab_size`` (so load pretrained text weights into the first rows, or before
    calling with a vocabulary-sized checkpoint). The processor's chat template is SmolVLM's (content lists with
    ``{"type": "image"}``) unless ``chat_template`` is given; a given tokenizer's own template is left alone.
    ``widen`` multiplies the LM head (default 30 for the tiny text model, 1 when ``text_config`` is given; with tied
    embeddings it scales the input embeddings too)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    if tokenizer is None:
        tok = idefics3_tokenizer()
    else:
        tok = tokenizer
        vocab = tok.get_vocab()
        missing = [t for t in IDEFICS3_NEEDED if t not in vocab]
        if missing:
            # add_tokens(special_tokens=True): matched whole, and leaves the tokenizer's special-token lists alone
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    template = IDEFICS3_CHAT_TEMPLATE if chat_template is None else chat_template

    if text_config is None:
        text_config = LlamaConfig(vocab_size=IDEFICS3_VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
        widen = WIDEN if widen is None else widen
    else:
        widen = 1.0 if widen is None else widen

    image_size, patch, scale = 32, 8, 2
    image_seq_len = (image_size // patch) ** 2 // scale**2  # 4
    config = Idefics3Config(
        text_config=text_config,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=patch),
        scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="eager")
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    if widen != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(widen)
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                                max_image_size={"longest_edge": image_size})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, chat_template=template,
                                  image_seq_len=image_seq_len)
    return model.eval(), processor


# --------------------------------------------------------------------------------------------- images, messages


def image(color=(255, 0, 0), size=(56, 56), shape: str = "square") -> Image.Image:
    """A coloured square / circle / triangle on white."""
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (w // 6, h // 6, w - 1 - w // 6, h - 1 - h // 6)
    if shape == "square":
        d.rectangle(box, fill=tuple(color))
    elif shape == "circle":
        d.ellipse(box, fill=tuple(color))
    elif shape == "triangle":
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=tuple(color))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def image_bytes(color=(255, 0, 0), size=(56, 56), shape: str = "square") -> bytes:
    buf = io.BytesIO()
    image(color, size, shape).save(buf, format="PNG")
    return buf.getvalue()


def vlm_messages(n_images: int, prompt: str, response: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": response}]},
    ]
