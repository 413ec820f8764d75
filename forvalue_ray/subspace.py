"""A fitted subspace for the sketch index: the part of each centered gradient that carries most of the energy is
kept exactly, and only the rest is sketched.

The per-sample LM-head gradient is a sum of outer products, G = Σ_t α_t h_tᵀ. Two projections with orthonormal rows,
A [k1, V] (the vocabulary side) and B [k2, d] (the hidden side), split a centered row X = G − μ into

    X = Π_A X Π_B + R,    Π_A = AᵀA,  Π_B = BᵀB,    ⟨X, X'⟩ = ⟨A X Bᵀ, A X' Bᵀ⟩ + ⟨R, R'⟩

(the cross terms vanish because the projectors are idempotent). An index row stores the k1·k2 coordinates A X Bᵀ
exactly and the TensorSketch of the residual, TS(R) = TS(X) − TS(Π_A X Π_B). The estimate of ⟨G, G'⟩ is unchanged
in form (⟨row, row'⟩ + ⟨G, μ⟩ + ⟨G', μ⟩ − ‖μ‖²) and still unbiased over the hashes, whatever the subspace; the
subspace only decides how much of the energy escapes the sketch's variance, which scales with ‖R‖²‖R'‖².

The projections are fitted on the centering sample (rows drawn from the corpus itself), the way LoGra initializes
its projections from data: B spans the top eigenvectors of Σ_i (G_i − μ)ᵀ(G_i − μ), and A the top left singular
vectors of the stacked (G_i − μ)Bᵀ — a two-sided principal subspace of the sample's centered gradients, computed
from each row's tokens without forming any [V, d] gradient.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .readout import DEFAULT_VOCAB_CHUNK, accumulation_dtype, block_sizes, deterministic, error_chunk
from .sketch import SketchHashes, sketch_of_matrix

FIT_COLUMNS = 4096  # rows × k2 columns of the stacked matrix the vocabulary side is fitted on: [V, 4096] float32


def fit_rows(k2: int) -> int:
    """How many sample rows a fit uses (the first ones of a random sample): FIT_COLUMNS // k2."""
    return max(1, FIT_COLUMNS // k2)


def parse_shape(text: str) -> tuple[int, int]:
    """'K1xK2' (e.g. '32x16') → (k1, k2): k1 vocabulary directions, k2 hidden directions."""
    try:
        k1, k2 = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"--subspace takes K1xK2 (vocabulary x hidden directions, e.g. 32x16), not {text!r}") from None
    if k1 < 1 or k2 < 1:
        raise ValueError(f"--subspace needs positive sizes, got {text!r}")
    return k1, k2


@dataclass
class Subspace:
    """Orthonormal rows: ``vocab`` A [k1, V], ``hidden`` B [k2, d] (float32)."""

    vocab: torch.Tensor
    hidden: torch.Tensor

    @property
    def size(self) -> int:
        return self.vocab.shape[0] * self.hidden.shape[0]

    def id(self) -> str:
        """A digest of both projections' bytes: an index and its target index must share it."""
        h = hashlib.blake2b(digest_size=16)
        for m in (self.vocab, self.hidden):
            h.update(m.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def to(self, device) -> "Subspace":
        return Subspace(self.vocab.to(device), self.hidden.to(device))

    def sketched_vocab_basis(self, hashes: SketchHashes) -> torch.Tensor:
        """CS₁ applied to each column of Aᵀ [dim, k1]: CS₁(Aᵀ a) = this @ a, so a projected error is sketched
        from its k1 coordinates."""
        a = self.vocab.to(hashes.vocab_signs.device)
        with deterministic():
            return torch.zeros(hashes.dim, a.shape[0], device=a.device).index_add_(
                0, hashes.vocab_buckets, a.T * hashes.vocab_signs[:, None])

    def project(self, m: torch.Tensor) -> torch.Tensor:
        """A M Bᵀ [k1, k2] (float64) of a dense [V, d] matrix."""
        return self.vocab.double().cpu() @ m.double().cpu() @ self.hidden.double().cpu().T

    def center_vector(self, mu: torch.Tensor, hashes: SketchHashes) -> np.ndarray:
        """What a centered index row subtracts, μ's stored vector: [A μ Bᵀ, TS(μ) − TS(Π_A μ Π_B)] (float32)."""
        coords = self.project(mu)
        inside = self.vocab.double().cpu().T @ coords @ self.hidden.double().cpu()
        residual = sketch_of_matrix(mu, hashes) - sketch_of_matrix(inside, hashes)
        return torch.cat([coords.reshape(-1), residual]).float().numpy()


def fit_subspace(head, h: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, seg: torch.Tensor, n_rows: int,
                 mu: torch.Tensor, k1: int, k2: int, vocab_chunk: int = DEFAULT_VOCAB_CHUNK) -> Subspace:
    """Fit A [k1, V] and B [k2, d] on the valued tokens (h, y, lse; ``seg`` = row) of ``n_rows`` rows of a sample
    whose mean gradient is ``mu`` [V, d]; callers pass at most :func:`fit_rows` rows (the stacked matrix A is
    fitted on is [V, n_rows·k2]). Deterministic: the same tokens give the same subspace."""
    acc, cd = torch.float64, accumulation_dtype(h.dtype)  # grams in float64; errors as the readout computes them
    dev, V, d = h.device, head.vocab_size, h.shape[1]
    if k1 > V or k2 > d:
        raise ValueError(f"--subspace {k1}x{k2} exceeds the model's vocabulary x hidden size {V}x{d}")
    rows = [torch.nonzero(seg == i).squeeze(1) for i in range(n_rows)]
    vocab_chunk = block_sizes(vocab_chunk, n_reference=len(y))[1]  # [tokens, chunk] errors within the budget
    mu_c = mu.to(dev, cd)
    # B: Σ_i (G_i − μ)ᵀ(G_i − μ) = Σ_i [h_iᵀ (α_i α_iᵀ) h_i − h_iᵀ (α_i μ) − (α_i μ)ᵀ h_i] + n μᵀμ, over vocabulary chunks
    kernels = [torch.zeros(len(r), len(r), dtype=acc, device=dev) for r in rows]
    a_mu = torch.zeros(len(y), d, dtype=acc, device=dev)
    mu_gram = torch.zeros(d, d, dtype=acc, device=dev)
    for v0 in range(0, V, vocab_chunk):
        v1 = min(v0 + vocab_chunk, V)
        a = error_chunk(head, h, y, lse, v0, v1, cd)
        for r, k in zip(rows, kernels):
            k += (a[r] @ a[r].T).double()
        a_mu += (a @ mu_c[v0:v1]).double()
        mu_gram += (mu_c[v0:v1].T @ mu_c[v0:v1]).double()
    hd = h.double()
    gram = n_rows * mu_gram
    for r, k in zip(rows, kernels):
        cross = hd[r].T @ a_mu[r]
        gram += hd[r].T @ k @ hd[r] - cross - cross.T
    B = _top_eigenvectors(gram, k2).T.float()
    # A: top left singular vectors of M = [(G_i − μ)Bᵀ]_i [V, n·k2], via the eigenvectors of MᵀM
    hb = h.to(cd) @ B.T.to(cd)  # [T, k2]
    mu_b = mu_c @ B.T.to(cd)  # [V, k2]
    M = torch.empty(V, len(rows) * k2, dtype=cd, device=dev)
    for v0 in range(0, V, vocab_chunk):
        v1 = min(v0 + vocab_chunk, V)
        a = error_chunk(head, h, y, lse, v0, v1, cd)
        for j, r in enumerate(rows):
            M[v0:v1, j * k2:(j + 1) * k2] = a[r].T @ hb[r] - mu_b[v0:v1]
    vecs, vals = _top_eigenvectors(M.T.double() @ M.double(), k1, values=True)
    A = (M.double() @ vecs) / vals.clamp_min(1e-300).sqrt()  # [V, k1]: M's left singular vectors
    A, _ = torch.linalg.qr(A)  # exactly orthonormal in float64 before the float32 cast
    return Subspace(A.T.float().contiguous(), B.contiguous())


def _top_eigenvectors(sym: torch.Tensor, k: int, values: bool = False):
    """The k leading eigenvectors (columns) of a symmetric matrix, each with a fixed sign (its largest entry
    positive) so that a fit is reproducible across machines."""
    if k > sym.shape[0]:
        raise ValueError(f"--subspace asks for {k} directions of a space of {sym.shape[0]}: use a smaller size or "
                         "a larger centering sample (--center)")
    evals, evecs = torch.linalg.eigh(sym)
    order = torch.argsort(evals, descending=True)[:k]
    vecs = evecs[:, order]
    vecs = vecs * torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))
    return (vecs, evals[order].clamp_min(0)) if values else vecs
