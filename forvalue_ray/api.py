"""The in-memory Python API (notebooks, small data). The Ray job scales the same calls out."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .encode import DEFAULT_MAX_LENGTH, Columns, Encoded, Encoder, RowError
from .engine import DEFAULT_MAX_TOKENS, Scorer, TargetStats, build_reference, finish_target_stats, target_partial
from .model import ValuationModel
from .readout import DEFAULT_VOCAB_CHUNK
from .sketch import DEFAULT_SKETCH_DIM


def encode_rows(vm: ValuationModel, rows: Iterable, *, max_length: int = DEFAULT_MAX_LENGTH,
                overlong: str = "truncate", columns: Columns = Columns(), form: str = "auto",
                image_column: str = "images") -> list[Encoded]:
    """Encode rows (dicts, or already :class:`Encoded`); a bad row raises with its index and reason."""
    kw = dict(max_length=max_length, overlong=overlong, columns=columns, vocab_size=vm.head.vocab_size, form=form)
    if getattr(vm, "processor", None) is not None:
        from .vision import VisionEncoder

        enc = VisionEncoder(vm.processor, image_column=image_column, **kw)
    else:
        enc = Encoder(vm.tokenizer, **kw)
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, Encoded):
            out.append(row)
            continue
        try:
            out.append(enc(row, fallback_id=str(i)))
        except RowError as e:
            raise RowError(f"row {i} (id {enc.row_id(row, str(i))!r}): {e}") from None
    if not out:
        raise ValueError("no rows given")
    return out


def target_statistics(vm: ValuationModel, target_rows, *, groups: Sequence | None = None,
                      normalize: bool = False, vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **encode_kw) -> TargetStats:
    """Ḡ over the target rows (one per group when ``groups`` labels each target row)."""
    rows = encode_rows(vm, target_rows, **encode_kw)
    labels = ["all"] * len(rows) if groups is None else [str(g) for g in groups]
    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} group labels for {len(rows)} target rows")
    names = sorted(set(labels))
    index = [names.index(g) for g in labels]
    total, counts = target_partial(vm, rows, index, len(names), normalize=normalize, vocab_chunk=vocab_chunk)
    return finish_target_stats(total, counts, names, normalize, vm.provenance)


def value_scores(vm: ValuationModel, train_rows, target_rows, *, normalize: bool = False,
                 vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **encode_kw) -> np.ndarray:
    """Mean over target rows of For-Value(train, target) (cosine For-Value if ``normalize``): [n_train]."""
    stats = target_statistics(vm, target_rows, normalize=normalize, vocab_chunk=vocab_chunk, **encode_kw)
    return score_against(vm, train_rows, stats, vocab_chunk=vocab_chunk, **encode_kw)[:, 0]


def group_scores(vm: ValuationModel, train_rows, target_rows, groups: Sequence, *, normalize: bool = False,
                 vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **encode_kw) -> tuple[list[str], np.ndarray]:
    """Mean For-Value against each group of target rows: (sorted group names, [n_train, K])."""
    stats = target_statistics(vm, target_rows, groups=groups, normalize=normalize, vocab_chunk=vocab_chunk,
                              **encode_kw)
    return stats.names, score_against(vm, train_rows, stats, vocab_chunk=vocab_chunk, **encode_kw)


def score_against(vm: ValuationModel, train_rows, stats: TargetStats, *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                  max_tokens: int = DEFAULT_MAX_TOKENS, padding_side: str = "right", **encode_kw) -> np.ndarray:
    """Scores of training rows against precomputed target statistics: [n_train, K]."""
    rows = encode_rows(vm, train_rows, **encode_kw)
    return Scorer(vm, stats=stats, normalize=stats.normalize, vocab_chunk=vocab_chunk, max_tokens=max_tokens,
                  padding_side=padding_side)(rows)["scores"]


def pairwise_scores(vm: ValuationModel, train_rows, target_rows, *, normalize: bool = False,
                    vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **encode_kw) -> np.ndarray:
    """For-Value of every (train, target) pair: [n_train, n_target]."""
    reference = build_reference(vm, encode_rows(vm, target_rows, **encode_kw), vocab_chunk=vocab_chunk)
    rows = encode_rows(vm, train_rows, **encode_kw)
    return Scorer(vm, reference=reference, normalize=normalize, vocab_chunk=vocab_chunk)(rows)["pairwise"]


def sketches(vm: ValuationModel, rows, *, dim: int = DEFAULT_SKETCH_DIM, seed: int = 0,
             vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **encode_kw) -> np.ndarray:
    """Per-row TensorSketches [n, dim]: ⟨sketch(z), sketch(z')⟩ estimates For-Value(z, z') without bias."""
    scorer = Scorer(vm, sketch_dim=dim, sketch_seed=seed, vocab_chunk=vocab_chunk)
    return scorer(encode_rows(vm, rows, **encode_kw))["sketch"]


def diagnostics(vm: ValuationModel, rows, **encode_kw) -> dict[str, np.ndarray]:
    """Per-row number of valued tokens and mean negative log-likelihood."""
    return Scorer(vm)(encode_rows(vm, rows, **encode_kw))
