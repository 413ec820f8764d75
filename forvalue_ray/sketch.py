"""TensorSketch of the per-sample LM-head gradient G = Σ_t α_t h_tᵀ.

TS(G) = IFFT( Σ_t FFT(CS₁ α_t) ⊙ FFT(CS₂ h_t) ) with two seeded CountSketches (bucket + sign hashes of
the vocabulary and of the hidden dimension; no V×dim matrix). ⟨TS(G), TS(G')⟩ is an unbiased estimate
of ⟨G, G'⟩ over the random hashes. CS₁ α_t is accumulated inside the vocabulary pass
(:class:`~forvalue_ray.readout.CountSketchOfError`); this module holds the hashes and the FFT combine.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .readout import deterministic

DEFAULT_SKETCH_DIM = 16384  # benchmarks/README.md: the smallest dim with AUC within 0.003 of exact and per-target Spearman ≥ 0.9 on every task


@dataclass
class SketchHashes:
    dim: int
    seed: int
    vocab_buckets: torch.Tensor  # [V] int64
    vocab_signs: torch.Tensor  # [V] ±1
    hidden_buckets: torch.Tensor  # [d]
    hidden_signs: torch.Tensor  # [d]

    @classmethod
    def make(cls, dim: int, seed: int, vocab_size: int, hidden_size: int, device=None) -> "SketchHashes":
        if dim < 2:
            raise ValueError(f"sketch dim must be at least 2, got {dim}")
        g = torch.Generator().manual_seed(int(seed))  # CPU generator: the same hashes on every machine

        def draw(n):
            return (torch.randint(0, dim, (n,), generator=g),
                    torch.randint(0, 2, (n,), generator=g).float() * 2 - 1)

        vb, vs = draw(vocab_size)
        hb, hs = draw(hidden_size)
        return cls(dim, seed, *(t.to(device) for t in (vb, vs, hb, hs)))


def count_sketch_hidden(h: torch.Tensor, hashes: SketchHashes, acc) -> torch.Tensor:
    out = torch.zeros(h.shape[0], hashes.dim, dtype=acc, device=h.device)
    with deterministic():
        return out.index_add_(1, hashes.hidden_buckets, h.to(acc) * hashes.hidden_signs.to(acc))


def sketch_spectrum(cs_error: torch.Tensor, h: torch.Tensor, hashes: SketchHashes, seg: torch.Tensor,
                    n_samples: int, token_block: int = 512) -> torch.Tensor:
    """Per-sample spectra Σ_t FFT(CS₁ α_t) ⊙ FFT(CS₂ h_t) [n_samples, dim//2 + 1] from the per-token error
    CountSketches and hidden states. Additive over tokens: sum the spectra of token blocks, then
    :func:`spectrum_to_sketch`. Tokens go in blocks so the [tokens, dim] spectra stay small (the sketch must
    not cost more memory than the forward pass)."""
    total = torch.zeros(n_samples, hashes.dim // 2 + 1, dtype=torch.complex128 if cs_error.dtype == torch.float64
                        else torch.complex64, device=cs_error.device)
    for t0 in range(0, cs_error.shape[0], token_block):
        block = slice(t0, t0 + token_block)
        cs_h = count_sketch_hidden(h[block], hashes, cs_error.dtype)
        spec = torch.fft.rfft(cs_error[block], dim=1) * torch.fft.rfft(cs_h, dim=1)
        with deterministic():
            total.index_add_(0, seg[block], spec)
    return total


def spectrum_to_sketch(spectrum: torch.Tensor, hashes: SketchHashes) -> torch.Tensor:
    """The TensorSketch (a circular convolution) from its summed spectrum."""
    return torch.fft.irfft(spectrum, n=hashes.dim, dim=1)


# ---- storage: the index's on-disk form of the float sketches -------------------------------------------------
STORAGES = ("float32", "float16", "int8")
SCORE_BLOCK_ROWS = 1024  # rows decoded to float64 at a time when scoring: a part is never copied whole


def compress_sketches(sk: np.ndarray, storage: str, ids: list[str], seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored form of float sketches [n, dim] and, for int8, one float32 scale per row (max |x| / 127).
    int8 rounds stochastically, up with probability equal to the remainder, so the stored sketch is an unbiased
    estimate of the float one and inner products of two rows stay unbiased. Each row's rounding draws are seeded by
    its id and the sketch seed: a re-run writes the same bytes."""
    if storage not in STORAGES:
        raise ValueError(f"--storage must be one of {STORAGES}, not {storage!r}")
    if storage != "int8":
        return sk.astype(storage), None
    sk = sk.astype(np.float32, copy=False)  # float32 throughout: 2.5x faster, biased by ~1e-6 of a step at most
    scale = (np.abs(sk).max(1, initial=0.0) / 127).astype(np.float32)
    unit = sk / np.where(scale > 0, scale, 1)[:, None]
    draws = np.stack([np.random.default_rng([seed, zlib.crc32(i.encode())]).random(sk.shape[1], np.float32)
                      for i in ids] or [np.zeros(sk.shape[1], np.float32)])[:len(ids)]
    return np.clip(np.floor(unit + draws), -127, 127).astype(np.int8), scale


def restore_sketches(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """float64 sketches from their stored form."""
    out = values.astype(np.float64)
    return out * scale.astype(np.float64)[:, None] if scale is not None else out


def score_sketches(values: np.ndarray, scale: np.ndarray | None, targets: np.ndarray, normalize: bool) -> np.ndarray:
    """Stored sketches [n, dim] against target columns [dim, K], SCORE_BLOCK_ROWS rows at a time; with normalize,
    each row is divided by its norm (cosine)."""
    out = np.empty((len(values), targets.shape[1]))
    for i in range(0, len(values), SCORE_BLOCK_ROWS):
        rows = slice(i, i + SCORE_BLOCK_ROWS)
        x = restore_sketches(values[rows], None if scale is None else scale[rows])
        if normalize:
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        out[rows] = x @ targets
    return out
