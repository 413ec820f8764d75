"""TensorSketch of the per-sample LM-head gradient G = Σ_t α_t h_tᵀ, and the sketch index's estimators.

TS(G) = IFFT( Σ_t FFT(CS₁ α_t) ⊙ FFT(CS₂ h_t) ) with two seeded CountSketches (bucket + sign hashes of
the vocabulary and of the hidden dimension; no V×dim matrix). ⟨TS(G), TS(G')⟩ is an unbiased estimate
of ⟨G, G'⟩ over the random hashes. CS₁ α_t is accumulated inside the vocabulary pass
(:class:`~forvalue_ray.readout.CountSketchOfError`); this module holds the hashes and the FFT combine.

Centering (a control variate): with μ the mean gradient of a sample of the corpus, a row keeps
c = TS(G) − TS(μ) and the exact a = ⟨G, μ⟩, and

    ⟨G, G'⟩ ≈ ⟨c, c'⟩ + a + a' − ‖μ‖²

is still unbiased (TS is linear; the last three terms are exact) with a variance that scales with
‖G − μ‖²‖G' − μ‖² instead of ‖G‖²‖G'‖². A raw index is the case μ = 0 (a = 0, ‖μ‖² = 0).
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from .readout import deterministic

DEFAULT_SKETCH_DIM = 4096  # benchmarks/docs/storage.md: int8 + centering at 4096 (4 KB per row) meets the fidelity goal


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
STORAGES = ("float32", "float16", "int8", "binary")
SCORE_BLOCK_ROWS = 1024  # rows decoded to float64 at a time when scoring: a part is never copied whole


def compress_sketches(sk: np.ndarray, storage: str, ids: list[str], seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored form of float sketches [n, dim] and, for int8, one float32 per row, for binary two.

    int8: the row's scale (max |x| / 127). Rounding is stochastic, up with probability equal to the remainder, so the
    stored sketch is an unbiased estimate of the float one and inner products of two rows stay unbiased. Each row's
    rounding draws are seeded by its id and the sketch seed: a re-run writes the same bytes.

    binary: the signs of the rotated row R x (:func:`rotate`), 8 to a byte [n, dim / 8] uint8, and per row [s, ‖x‖]
    (float32 [n, 2]). A row restores as x̂ = Rᵀ (s · sign(R x)) with s = ‖x‖² / ‖R x‖₁, the multiple whose inner
    product with the row itself is exact: ⟨x̂, y⟩ estimates ⟨x, y⟩ exactly along x, and the part of y orthogonal to x
    adds an error of mean zero when that part is symmetric (R spreads every row over all coordinates, so signs see
    near-Gaussian values; for Gaussian ones s = √(π/2) ‖x‖/√dim). The rows' own norm ‖x‖ serves the cosine. 1 bit per
    number: at equal bytes, 8 times the dimensions of int8 (benchmarks/docs/storage.md)."""
    if storage not in STORAGES:
        raise ValueError(f"--storage must be one of {STORAGES}, not {storage!r}")
    if storage == "binary":
        if sk.shape[1] % 8:
            raise ValueError(f"binary storage packs 8 signs to a byte: the row length ({sk.shape[1]}) must be a "
                             f"multiple of 8")
        rotated = rotate(sk)
        sq, l1 = (rotated ** 2).sum(1), np.abs(rotated).sum(1)
        scale = np.stack([sq / np.where(l1 > 0, l1, 1), np.sqrt(sq)], 1).astype(np.float32)
        return np.packbits(rotated >= 0, axis=1), scale
    if storage != "int8":
        return sk.astype(storage), None
    sk = sk.astype(np.float32, copy=False)  # float32 throughout: 2.5x faster, biased by ~1e-6 of a step at most
    scale = (np.abs(sk).max(1, initial=0.0) / 127).astype(np.float32)
    unit = sk / np.where(scale > 0, scale, 1)[:, None]
    draws = np.stack([np.random.default_rng([seed, zlib.crc32(i.encode())]).random(sk.shape[1], np.float32)
                      for i in ids] or [np.zeros(sk.shape[1], np.float32)])[:len(ids)]
    return np.clip(np.floor(unit + draws), -127, 127).astype(np.int8), scale


def restore_sketches(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """float64 sketches from their stored form (binary: packed uint8 signs, the scale each row's [s, ‖x‖])."""
    if values.dtype == np.uint8:  # s · sign(R x), rotated back
        return rotate((np.unpackbits(values, axis=1) * 2.0 - 1) * scale[:, :1].astype(np.float64), inverse=True)
    out = values.astype(np.float64)
    return out * scale.astype(np.float64)[:, None] if scale is not None else out


BINARY_ROTATION = "hartley-2"  # the binary storage's rotation, recorded in a binary index's index.json


@lru_cache(maxsize=8)
def _rotation_signs(dim: int) -> tuple[np.ndarray, np.ndarray]:
    # fixed, not drawn from the sketch seed: the sketch's own hashes are the randomness; any index restores alone
    first, second = np.random.default_rng(0xB1A5).integers(0, 2, (2, dim)).astype(np.float64) * 2 - 1
    return first, second


def _hartley(x: np.ndarray) -> np.ndarray:
    """The unitary discrete Hartley transform of rows [n, dim] (symmetric and its own inverse)."""
    f = np.fft.fft(x, axis=1)
    return (f.real - f.imag) / np.sqrt(x.shape[1])


def rotate(x: np.ndarray, inverse: bool = False) -> np.ndarray:
    """The orthogonal R x = DHT(D₂ DHT(D₁ x)) of rows [n, dim] (float64): D₁, D₂ fixed random signs, DHT the
    unitary discrete Hartley transform. Spreads a row's energy over every coordinate so that the binary storage's
    signs see near-Gaussian values, which its scale assumes. Two rounds, because one is not enough for a sketch with
    a few dominant coordinates (the few huge entries of G where a hidden state has a massive activation): one round
    turns each into a ±c pattern over all coordinates, a sum of few such patterns is far from Gaussian, and the
    estimate of ⟨x, y⟩ between two rows sharing them is biased (+3.45% in tests/core/test_sketch.py; on real
    tasks it cost 0.0025 of class AUC at any dimension); the second round makes every coordinate a sum of all."""
    first, second = _rotation_signs(x.shape[1])
    x = x.astype(np.float64)
    if inverse:
        return _hartley(_hartley(x) * second) * first
    return _hartley(_hartley(x * first) * second)


def sketch_of_matrix(m: torch.Tensor, hashes: SketchHashes, vocab_block: int = 8192) -> torch.Tensor:
    """TS(M) [dim] float64 of a dense [V, d] matrix such as a mean gradient μ. TS is linear, so TS(μ) is the mean
    of the sketches of the rows μ is the mean of. M = Σ_j M[:, j] e_jᵀ: each column is a "token" whose error is
    the column and whose hidden state is e_j, so CS₂ e_j = s_j at bucket b_j and the circular convolution is a
    shift: TS(M) = Σ_j s_j roll(CS₁ M[:, j], b_j)."""
    cs = torch.zeros(hashes.dim, m.shape[1], dtype=torch.float64)
    buckets, signs = hashes.vocab_buckets.cpu(), hashes.vocab_signs.cpu().double()
    with deterministic():
        for v0 in range(0, m.shape[0], vocab_block):  # a float64 copy of one block of rows at a time
            block = slice(v0, v0 + vocab_block)
            cs.index_add_(0, buckets[block], m[block].cpu().double() * signs[block, None])
    out = torch.zeros(hashes.dim, dtype=torch.float64)
    for j, (b, s) in enumerate(zip(hashes.hidden_buckets.tolist(), hashes.hidden_signs.tolist())):
        out += s * torch.roll(cs[:, j], b)
    return out


def center_id(mu: torch.Tensor) -> str:
    """The identity of a centering μ: a digest of its bytes. An index and its target index must share it."""
    return hashlib.blake2b(mu.detach().cpu().float().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def _blocks(n: int, size: int):
    return (slice(i, i + size) for i in range(0, n, size))


def _sq_norm_estimates(sketch_sq: np.ndarray, center_dot: np.ndarray | None, center_sq_norm: float) -> np.ndarray:
    """‖G‖² ≈ ‖c‖² + 2⟨G, μ⟩ − ‖μ‖² from ‖c‖² (‖TS(G)‖² for a raw index), floored above 0 for the cosine's division."""
    sq = np.asarray(sketch_sq, np.float64)
    if center_dot is not None:
        sq = sq + 2 * center_dot - center_sq_norm
    return np.maximum(sq, 1e-60)


def _stored_sq_norms(values: np.ndarray, scale: np.ndarray | None, widened: np.ndarray) -> np.ndarray:
    """‖x‖² of stored rows from their widened values (before any scale): a binary row's is its stored norm squared
    (the norm of its signs is not the row's)."""
    if values.dtype == np.uint8:
        return scale[:, 1].astype(np.float64) ** 2
    sq = np.einsum("nd,nd->n", widened, widened).astype(np.float64)
    return sq if scale is None else sq * scale.astype(np.float64) ** 2


@dataclass
class SketchTargets:
    """The target side of scoring a sketch index: for each column k (the mean, a group, or one target row),
    score(i, k) = (⟨c_i, columns[:, k]⟩ + a_i · weights[k] + offsets[k]) / N_i, where for the target rows j of k,
    each with weight w_j = 1/|k| (÷ its estimated ‖G_j‖ for the cosine), columns[:, k] = Σ w_j c_j,
    weights[k] = Σ w_j and offsets[k] = Σ w_j (a_j − ‖μ‖²); N_i = 1, or row i's estimated ‖G_i‖ (cosine)."""

    names: list[str]
    columns: np.ndarray  # [dim, K] float64
    weights: np.ndarray  # [K]
    offsets: np.ndarray  # [K]
    normalize: bool
    center_sq_norm: float  # ‖μ‖²; 0 for a raw index


def sketch_targets(values: np.ndarray, scale: np.ndarray | None, labels: Sequence[str], names: Sequence[str], *,
                   normalize: bool = False, center_dot: np.ndarray | None = None,
                   center_sq_norm: float = 0.0) -> SketchTargets:
    """The target columns from target index rows (stored sketches, int8 scales, ⟨G_j, μ⟩ when centered): column k
    averages the rows labelled names[k] (one label for the mean, the group per row, or each row's own id for
    pairwise scores)."""
    index = {name: k for k, name in enumerate(names)}
    missing = sorted(set(labels) - set(index))
    if missing:
        raise ValueError(f"target labels {missing[:5]} are not among the columns {list(names)[:5]}")
    col = np.array([index[g] for g in labels], dtype=np.int64)
    x = restore_sketches(values, scale)
    a = np.zeros(len(x)) if center_dot is None else np.asarray(center_dot, np.float64)
    w = 1.0 / np.bincount(col, minlength=len(names))[col]
    if normalize:
        sq = _stored_sq_norms(values, scale if values.dtype == np.uint8 else None, x)  # x: restored, scaled
        w = w / np.sqrt(_sq_norm_estimates(sq, center_dot, center_sq_norm))
    columns = np.zeros((len(names), x.shape[1]))
    np.add.at(columns, col, x * w[:, None])
    return SketchTargets(list(names), columns.T, np.bincount(col, w, len(names)),
                         np.bincount(col, w * (a - center_sq_norm), len(names)), normalize, float(center_sq_norm))


def score_sketches(values: np.ndarray, scale: np.ndarray | None, targets: SketchTargets,
                   center_dot: np.ndarray | None = None) -> np.ndarray:
    """Scores [n, K] of stored index rows [n, dim] (and ⟨G_i, μ⟩ when centered) against the target columns,
    SCORE_BLOCK_ROWS rows at a time (binary: fewer, 2¹⁹ unpacked bits a block). Stored values widen to float32 (never a float64 copy: the scan is bound by
    memory traffic) and the int8 scale applies to the [n, K] products; sums run in float32, a relative error of
    ~1e-6, far below the sketch's own. Binary rows are scored in the rotated basis: the columns are rotated once,
    the rows' signs never leave it, and a row's ‖x‖² is its stored norm squared."""
    binary = values.dtype == np.uint8
    columns = (rotate(targets.columns.T).T if binary else targets.columns).astype(np.float32)
    # binary: s·(2b − 1)·c = s·(b·2c − Σc) on the unpacked bits b, in blocks small enough to stay in cache
    block = min(SCORE_BLOCK_ROWS, max(8, 2 ** 19 // (8 * values.shape[1]))) if binary else SCORE_BLOCK_ROWS
    doubled, column_sums = 2 * columns, columns.sum(0, dtype=np.float64)
    out = np.empty((len(values), len(targets.names)))
    for rows in _blocks(len(values), block):
        x = (np.unpackbits(values[rows], axis=1).astype(np.float32) if binary
             else values[rows].astype(np.float32, copy=False))
        row_scale = None if scale is None else scale[rows, 0] if binary else scale[rows]
        s = (x @ doubled).astype(np.float64) - column_sums if binary else (x @ columns).astype(np.float64)
        if row_scale is not None:
            s *= row_scale.astype(np.float64)[:, None]
        s += targets.offsets[None, :]
        a = None if center_dot is None else np.asarray(center_dot[rows], np.float64)
        if a is not None:
            s += a[:, None] * targets.weights[None, :]
        if targets.normalize:
            sq = _stored_sq_norms(values[rows], None if scale is None else scale[rows], x)
            s /= np.sqrt(_sq_norm_estimates(sq, a, targets.center_sq_norm))[:, None]
        out[rows] = s
    return out
