"""The For-Value math: a fused, vocabulary-chunked readout of the LM head.

Everything here works on *valued tokens* only, flattened across a batch: ``h`` [N, d] are the final
hidden states that predict labels ``y`` [N]; ``seg`` [N] says which sample each token belongs to.
Nothing here knows about models, batching or Ray (DESIGN.md §2).

For a head producing logits ``z = softcap(scale * (W h + b))`` and ``u = W h``, the error vector is
``α = ∂ log softmax(z)[y] / ∂u = f'(u) ⊙ (e_y − p)`` with ``f' = scale * (1 − tanh²)`` (``f' = scale``
without soft-capping). The per-sample LM-head gradient is ``G = Σ_t α_t h_tᵀ``; every score is an
inner product of such gradients. No [N, V] tensor is ever materialised: the vocabulary is walked in
chunks with an online log-sum-exp, and each quantity of the form ``Σ_v α_t[v] w_t[v]`` is accumulated as

    f'_t[y_t] w_t[y_t]  −  (Σ_v exp(z_tv − m_t) f'_tv w_tv) / (Σ_v exp(z_tv − m_t))

with the running maximum ``m_t`` rescaling the partial sums, so one pass suffices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_VOCAB_CHUNK = 8192


@dataclass(frozen=True)
class LMHead:
    """The model's own logit function: ``softcap(scale * (weight @ h + bias))``."""

    weight: torch.Tensor  # [V, d]
    bias: torch.Tensor | None = None  # [V]
    scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def _activate(self, u, bias, dense_fp: bool):
        """u = W h (acc precision) → z and f'; without soft-capping f' is the constant scale, kept a
        float on chunks to save an [N, chunk] tensor."""
        if bias is not None:
            u = u + bias.to(u.dtype)
        z = u * self.scale
        if self.softcap is None:
            return z, (torch.full_like(z, self.scale) if dense_fp else self.scale)
        t = torch.tanh(z / self.softcap)
        return t * self.softcap, self.scale * (1.0 - t * t)

    def _bias(self, index):
        return None if self.bias is None else self.bias[index]

    def logits(self, h: torch.Tensor, v0: int = 0, v1: int | None = None, acc=torch.float32):
        """Logits z[:, v0:v1] in ``acc`` precision and f' on that slice (a float when constant)."""
        w = self.weight[v0:v1]
        return self._activate((h.to(w.dtype) @ w.T).to(acc), self._bias(slice(v0, v1)), False)

    def logits_columns(self, h: torch.Tensor, ids: torch.Tensor, acc=torch.float32):
        """z[:, ids] and f'[:, ids] for a few vocabulary ids."""
        w = self.weight[ids]
        return self._activate((h.to(w.dtype) @ w.T).to(acc), self._bias(ids), True)

    def logits_at(self, h: torch.Tensor, ids: torch.Tensor, acc=torch.float32):
        """z[n, ids[n]] and f'[n, ids[n]]: one id per token, without a vocabulary pass."""
        u = (h.to(acc) * self.weight[ids].to(acc)).sum(-1)
        return self._activate(u, self._bias(ids), True)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 softmax and accumulators whatever the model dtype; fp64 stays fp64 (oracle tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Accumulator:
    """A quantity ``Σ_v α_t[v] w_t[v]`` (or a vector of them) accumulated along a vocabulary pass."""

    def chunk(self, h, v0, v1, e):
        """Add ``Σ_{v in chunk} e[n, v] * w_n[v]`` to the running sum; ``e = exp(z − m) f'``."""
        raise NotImplementedError

    def rescale(self, r):
        """Multiply the running sum by the per-token factor r = exp(m_old − m_new)."""
        self.total = self.total * r.view(-1, *([1] * (self.total.dim() - 1)))

    def at_label(self, h, y):
        """``w_n[y_n]``, evaluated directly for the label term."""
        raise NotImplementedError


class TargetStatDot(Accumulator):
    """w_t = Ḡ_k h_t for K target statistics Ḡ [K, V, d]: the exact value of §2.1."""

    def __init__(self, stats: torch.Tensor, n: int, acc):
        self.stats, self.acc = stats, acc
        self.total = torch.zeros(n, stats.shape[0], dtype=acc, device=stats.device)

    def _w(self, h, v0, v1):
        k, c, d = self.stats.shape[0], v1 - v0, self.stats.shape[2]
        g = self.stats[:, v0:v1].reshape(k * c, d)
        return (h.to(g.dtype) @ g.T).to(self.acc).view(-1, k, c)

    def chunk(self, h, v0, v1, e):
        self.total += torch.einsum("nc,nkc->nk", e, self._w(h, v0, v1))

    def at_label(self, h, y):
        g = self.stats[:, y]  # [K, N, d]
        return torch.einsum("nd,knd->nk", h.to(self.acc), g.to(self.acc))


class TokenKernel(Accumulator):
    """w_t = α'_s for reference tokens s (their h', y', lse' fixed): α_t·α'_s for every pair (§2.2)."""

    def __init__(self, head: LMHead, ref: "ReferenceTokens", n: int, acc):
        self.head, self.ref, self.acc = head, ref, acc
        self.total = torch.zeros(n, ref.h.shape[0], dtype=acc, device=ref.h.device)

    def chunk(self, h, v0, v1, e):
        self.total += e @ self.ref.alpha(self.head, v0, v1, self.acc).T

    def at_label(self, h, y):
        # α'_s[y_t] for every pair (t, s): the reference logits at the train labels.
        r = self.ref
        z, fp = self.head.logits_columns(r.h, y, self.acc)  # [S, N]
        delta = (r.y[:, None] == y[None, :]).to(self.acc)
        return (fp * (delta - torch.exp(z - r.lse[:, None]))).T


class CountSketchOfError(Accumulator):
    """w_t[v] = sign(v) e_bucket(v): the CountSketch of α_t into ``dim`` buckets, no V×dim matrix."""

    def __init__(self, buckets: torch.Tensor, signs: torch.Tensor, dim: int, n: int, acc):
        self.buckets, self.signs, self.acc = buckets, signs.to(acc), acc
        self.total = torch.zeros(n, dim, dtype=acc, device=buckets.device)

    def chunk(self, h, v0, v1, e):
        self.total.index_add_(1, self.buckets[v0:v1], e * self.signs[v0:v1])

    def at_label(self, h, y):
        # a one-hot per token in its label's bucket, carried as (bucket, sign).
        return self.buckets[y], self.signs[y]

    def finish(self, label_coef, total_coef, y):
        out = self.total * total_coef[:, None]
        b, s = self.at_label(None, y)
        out[torch.arange(len(y), device=y.device), b] += label_coef * s
        return out


@dataclass
class ReferenceTokens:
    """Valued tokens of a fixed (target) set, kept for the pairwise kernel: h', y', lse', owner."""

    h: torch.Tensor  # [S, d]
    y: torch.Tensor  # [S]
    lse: torch.Tensor  # [S]
    seg: torch.Tensor  # [S] index of the target row owning each token

    def alpha(self, head: LMHead, v0: int, v1: int, acc) -> torch.Tensor:
        z, fp = head.logits(self.h, v0, v1, acc)
        a = -torch.exp(z - self.lse[:, None])
        hit = (self.y >= v0) & (self.y < v1)
        idx = hit.nonzero().squeeze(1)
        a[idx, self.y[idx] - v0] += 1.0
        return a if isinstance(fp, float) and fp == 1.0 else a * fp


@dataclass
class PassResult:
    lse: torch.Tensor  # [N] log-sum-exp of the model's logits
    nll: torch.Tensor  # [N] −log p(y_t)
    values: list  # one entry per accumulator: Σ_v α_t[v] w_t[v] (CountSketch: the sketch rows)


def vocab_pass(head: LMHead, h: torch.Tensor, y: torch.Tensor, accumulators=(),
               chunk: int = DEFAULT_VOCAB_CHUNK) -> PassResult:
    """One pass over the vocabulary: log-likelihoods and every accumulator, exactly, in O(N·chunk) memory."""
    acc = accumulation_dtype(h.dtype)
    n = h.shape[0]
    m = torch.full((n,), -torch.inf, dtype=acc, device=h.device)
    s = torch.zeros(n, dtype=acc, device=h.device)
    for v0 in range(0, head.vocab_size, chunk):
        v1 = min(v0 + chunk, head.vocab_size)
        z, fp = head.logits(h, v0, v1, acc)
        m_new = torch.maximum(m, z.max(dim=1).values)
        r = torch.exp(m - m_new)
        p = torch.exp(z - m_new[:, None])
        s = s * r + p.sum(1)
        e = p if isinstance(fp, float) and fp == 1.0 else p * fp
        for a in accumulators:
            a.rescale(r)
            a.chunk(h, v0, v1, e)
        m = m_new
    lse = m + torch.log(s)
    z_y, fp_y = head.logits_at(h, y, acc)
    values = []
    for a in accumulators:
        if isinstance(a, CountSketchOfError):
            values.append(a.finish(fp_y, -1.0 / s, y))
        else:
            values.append(fp_y[:, None] * a.at_label(h, y) - a.total / s[:, None])
    return PassResult(lse=lse, nll=lse - z_y, values=values)


def error_chunk(head: LMHead, h, y, lse, v0, v1, acc) -> torch.Tensor:
    """α[:, v0:v1] exactly, given each token's log-sum-exp from a first pass."""
    return ReferenceTokens(h, y, lse, None).alpha(head, v0, v1, acc)


def weighted_gradient_sum(head: LMHead, h, y, lse, weights: torch.Tensor, n_out: int,
                          out_index: torch.Tensor, chunk: int = DEFAULT_VOCAB_CHUNK) -> torch.Tensor:
    """Σ_t weights_t α_t h_tᵀ into ``n_out`` [V, d] fp32 matrices (``out_index`` picks one per token).

    This builds the target statistics Ḡ (§2.1): one matrix per group, each token weighted by
    1/(rows in its group) — and by 1/‖G(z')‖ for the cosine variant.
    """
    acc = accumulation_dtype(h.dtype)
    out = torch.zeros(n_out, head.vocab_size, h.shape[1], dtype=acc, device=h.device)
    hw = h.to(acc) * weights.to(acc)[:, None]
    for k in range(n_out):
        sel = (out_index == k).nonzero().squeeze(1)
        if len(sel) == 0:
            continue
        for v0 in range(0, head.vocab_size, chunk):
            v1 = min(v0 + chunk, head.vocab_size)
            a = error_chunk(head, h[sel], y[sel], lse[sel], v0, v1, acc)
            out[k, v0:v1] += a.T @ hw[sel]
    return out


def segment_sum(x: torch.Tensor, seg: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """Sum the rows (dim 0) or columns (dim 1) of x that share a segment id."""
    shape = list(x.shape)
    shape[dim] = n
    return torch.zeros(shape, dtype=x.dtype, device=x.device).index_add_(dim, seg, x)


def gradient_sq_norms(head: LMHead, h, y, lse, seg, n_samples: int,
                      chunk: int = DEFAULT_VOCAB_CHUNK) -> torch.Tensor:
    """‖G(z)‖²_F = Σ_{t,s∈z} (α_t·α_s)(h_t·h_s) per sample (the cosine variant's denominator).

    A second vocabulary pass (α needs each token's final log-sum-exp): one batched logits product per
    chunk, then each sample's own [T, T] Gram of errors."""
    acc = accumulation_dtype(h.dtype)
    members = [(seg == i).nonzero().squeeze(1) for i in range(n_samples)]
    gram_a = [torch.zeros(len(m), len(m), dtype=acc, device=h.device) for m in members]
    for v0 in range(0, head.vocab_size, chunk):
        v1 = min(v0 + chunk, head.vocab_size)
        a = error_chunk(head, h, y, lse, v0, v1, acc)
        for g, m in zip(gram_a, members):
            g += a[m] @ a[m].T
    out = torch.zeros(n_samples, dtype=acc, device=h.device)
    for i, (g, m) in enumerate(zip(gram_a, members)):
        hs = h[m].to(acc)
        out[i] = (g * (hs @ hs.T)).sum()
    return out
