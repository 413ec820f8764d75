"""Image-text rows → processor inputs with a loss mask on the response (assistant) tokens only.

A row has one or more images (an ``images`` column: PNG/JPEG bytes, ``{"bytes", "path"}`` structs as Hugging
Face and Ray Data store them, or paths / ``s3://`` URIs) and ``prompt``/``response`` or chat ``messages``
whose content lists hold ``{"type": "image"}`` placeholders, filled in order from the images column.
The valued tokens are found per row from the processor's own output: the tokens a turn adds after the
rendered prefix that ends with the assistant header. Image decoding and resizing run here, in the CPU stage.
"""

from __future__ import annotations

import io as _bytes_io

import numpy as np

from .encode import IGNORE, Columns, Encoded, Encoder, RowError, common_prefix_length

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_IMAGE_BYTES = 50 << 20
IMAGE_COLUMN = Columns.images


def load_image(value, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
    """Decode one image to RGB; corrupt, missing or oversized images raise RowError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        from . import io

        try:
            fs, path = io.filesystem(value)
            if fs.size(path) > max_bytes:
                raise RowError(f"image {value} is over {max_bytes} bytes")
            with fs.open(path, "rb") as fh:
                value = fh.read()
        except (FileNotFoundError, OSError) as e:
            raise RowError(f"image {value!r} could not be read: {e}") from None
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise RowError(f"an image must be bytes, a {{bytes, path}} struct or a path, got {type(value).__name__}")
    if len(value) > max_bytes:
        raise RowError(f"image is over {max_bytes} bytes")
    try:
        img = Image.open(_bytes_io.BytesIO(value))
        if img.width * img.height > max_pixels:
            raise RowError(f"image is {img.width}x{img.height}, over {max_pixels} pixels")
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise RowError(f"corrupt image: {type(e).__name__}: {e}") from None


def _count_images(messages) -> int:
    return sum(1 for m in messages for c in (m["content"] if isinstance(m["content"], list) else [])
               if isinstance(c, dict) and c.get("type") == "image")


class VisionEncoder(Encoder):
    """Encoder for image-text rows through a Hugging Face processor (text rows still work)."""

    def __init__(self, processor, *, image_column: str = IMAGE_COLUMN, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 **kw):
        super().__init__(processor.tokenizer, **kw)
        self.processor, self.image_column, self.max_image_pixels = processor, image_column, max_image_pixels

    def __call__(self, row: dict, fallback_id: str = "") -> Encoded:
        images = row.get(self.image_column)
        if images is None or (hasattr(images, "__len__") and len(images) == 0):
            return super().__call__(row, fallback_id)
        if isinstance(images, (bytes, str, dict)):
            images = [images]
        pil = [load_image(v, self.max_image_pixels) for v in images]
        messages = self._messages(row, len(pil))
        ids, labels, vision = self._encode(messages, pil)
        if len(ids) > self.max_length:
            # truncating through an image would orphan its features: reject instead
            raise RowError(f"over-long: {len(ids)} tokens (images included) > max_length {self.max_length}")
        out = Encoded(self.row_id(row, fallback_id), np.asarray(ids, np.int64), np.asarray(labels, np.int64), vision)
        if out.n_valued == 0:
            raise RowError("no valued token")
        return out

    def _messages(self, row: dict, n_images: int) -> list:
        c = self.columns
        if row.get(c.messages) is not None:
            messages = [dict(m) for m in row[c.messages]]
            for m in messages:
                if not isinstance(m.get("role"), str) or m.get("content") is None:
                    raise RowError("each message needs 'role' and 'content'")
                if isinstance(m["content"], str):
                    m["content"] = [{"type": "text", "text": m["content"]}]
                else:
                    m["content"] = [{k: v for k, v in dict(x).items() if v is not None} for x in m["content"]]
            if not any(m["role"] == "assistant" for m in messages):
                raise RowError("no assistant turn to value")
            placeholders = _count_images(messages)
            if placeholders == 0:
                messages[0]["content"] = [{"type": "image"}] * n_images + messages[0]["content"]
            elif placeholders != n_images:
                raise RowError(f"{placeholders} image placeholders in the messages but {n_images} images")
            return messages
        if row.get(c.prompt) is None or row.get(c.response) is None:
            raise RowError(f"an image row needs '{c.prompt}' + '{c.response}' or '{c.messages}'")
        for k in (c.prompt, c.response):
            if not isinstance(row[k], str):
                raise RowError(f"column '{k}' must be a string, got {type(row[k]).__name__}")
        if not row[c.response].strip():
            raise RowError(f"column '{c.response}' is empty")
        return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": row[c.prompt]}]},
                {"role": "assistant", "content": [{"type": "text", "text": row[c.response]}]}]

    def _process(self, messages, images, generation_prompt: bool):
        try:
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            out = self.processor(text=[text], images=[images] if images else None, return_tensors="np")
        except RowError:
            raise
        except Exception as e:  # processors raise many types; the row, not the job, fails
            raise RowError(f"processor failed: {type(e).__name__}: {e}") from None
        return out

    def _encode(self, messages, images):
        full = self._process(messages, images, False)
        ids = full["input_ids"][0].tolist()
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            seen = _count_images(messages[: i + 1])
            end = self._process(messages[: i + 1], images[:seen], False)["input_ids"][0].tolist()
            if i:
                before = self._process(messages[:i], images[:_count_images(messages[:i])], True)["input_ids"][0].tolist()
            else:  # an assistant-first conversation: its header (and any images it opens with) is what the
                # same turn emptied of text shares with it; templates refuse an empty conversation
                emptied = [{**m, "content": [{**x, "text": ""} if x.get("type") == "text" else x for x in m["content"]]}
                           for m in messages[:1]]
                empty = self._process(emptied, images[:seen], False)["input_ids"][0].tolist()
                before = end[:common_prefix_length(empty, end)]
            if ids[: len(end)] != end or end[: len(before)] != before:
                raise RowError("the chat template is not prefix-stable for this row")
            labels[len(before):len(end)] = ids[len(before):len(end)]
        vision = {k: np.asarray(v) for k, v in full.items() if k not in ("input_ids", "attention_mask")}
        return ids, labels, vision


TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")  # one value per token, padded like input_ids


def collate_vision(rows: list[dict | None], longest: int) -> dict:
    """Batch per-row processor outputs for a right-padded batch of ``longest`` tokens. Per-token arrays are
    zero-padded; per-image tensors with a leading row axis ([1, n_images, …], Idefics3) are padded with zero
    images (which the model skips) and stacked; flat ones (Qwen2-VL patches, grids) are concatenated."""
    import torch

    keys = sorted({k for r in rows if r for k in r})
    out = {}
    for k in keys:
        arrays = [r[k] for r in rows if r and k in r]
        if k in TOKEN_KEYS:
            batch = np.zeros((len(rows), longest), arrays[0].dtype)
            for i, r in enumerate(rows):
                if r and k in r:
                    batch[i, : r[k].shape[1]] = r[k][0]
            out[k] = torch.as_tensor(batch)
        elif arrays[0].ndim >= 4 and arrays[0].shape[0] == 1:
            n = max(a.shape[1] for a in arrays)
            shape = arrays[0].shape[2:]
            padded = []
            for r in rows:
                a = r[k] if r and k in r else np.zeros((1, 0) + shape, arrays[0].dtype)
                pad = np.zeros((1, n - a.shape[1]) + shape, a.dtype)
                padded.append(np.concatenate([a, pad], axis=1))
            out[k] = torch.as_tensor(np.concatenate(padded))
        else:
            out[k] = torch.as_tensor(np.concatenate(arrays))
    return out
