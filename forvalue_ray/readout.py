"""The For-Value math: a fused, vocabulary-chunked readout of the LM head.

Everything here works on *valued tokens* only, flattened across a batch: ``h`` [N, d] are the final
hidden states that predict labels ``y`` [N]; ``seg`` [N] says which sample each token belongs to.
Nothing here knows about models, batching or Ray.

For a head producing logits ``z = softcap(scale * (W h + b))`` and ``u = W h + b``, the error vector is
``α = ∂ log softmax(z)[y] / ∂u = f'(u) ⊙ (e_y − p)`` with ``f' = scale * (1 − tanh²)`` (``f' = scale``
without soft-capping). The per-sample LM-head gradient is ``G = Σ_t α_t h_tᵀ``; every score is an
inner product of such gradients. No [N, V] tensor is ever materialised: the vocabulary is walked in
chunks with an online log-sum-exp, and each quantity of the form ``Σ_v α_t[v] w_t[v]`` is accumulated as

    f'_t[y_t] w_t[y_t]  −  (Σ_v exp(z_tv − m_t) f'_tv w_tv) / (Σ_v exp(z_tv − m_t))

with the running maximum ``m_t`` rescaling the partial sums, so one pass suffices.

A head bias b is folded into the weight (``W̃ = [W | b]``, ``h̃ = [h; 1]``, done by :mod:`model`): the
gradient of W̃ is ``Σ_t α_t h̃_tᵀ``, whose last column is ∂/∂b, so every score below includes the bias term.

Memory is bounded by ``budget`` elements per [tokens, chunk]-shaped intermediate, whatever the row length,
number of target groups or target tokens: callers walk tokens in blocks and the vocabulary in chunks sized
by :func:`block_sizes`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DEFAULT_VOCAB_CHUNK = 8192
READOUT_BUDGET = 1 << 23  # elements (32 MiB in fp32) per [tokens, chunk]-shaped intermediate of the readout


def block_sizes(vocab_chunk: int, n_groups: int = 0, n_reference: int = 0, sketch_dim: int = 0,
                budget: int = READOUT_BUDGET) -> tuple[int, int]:
    """(tokens per block, vocabulary chunk) so that no readout intermediate exceeds ``budget`` elements:
    [block, chunk] logits, [block, K, chunk] group products, [reference, chunk] reference errors,
    [block, reference] kernels and [block, sketch_dim] error sketches."""
    chunk = max(1, min(vocab_chunk, budget // max(1, n_reference), budget // max(1, n_groups)))
    width = max(chunk * max(1, n_groups), n_reference, sketch_dim, 1)
    return max(1, budget // width), chunk


@contextlib.contextmanager
def deterministic():
    """Deterministic scatter-adds (``index_add_`` is atomic, hence order-dependent, on CUDA): a retried
    shard must rewrite the same bytes. Scoped, so the model's own kernels keep their fast paths."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@dataclass(frozen=True)
class LMHead:
    """The model's own logit function: ``softcap(scale * (weight @ h))``; a bias is a column of ``weight``."""

    weight: torch.Tensor  # [V, d] ([V, d + 1] with a folded bias)
    scale: float = 1.0
    softcap: float | None = None
    folded_bias: bool = False

    @property
    def hidden_size(self) -> int:
        """d: the model's hidden size (the weight's last column is the bias when one is folded)."""
        return self.weight.shape[1] - int(self.folded_bias)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def _activate(self, u, dense_fp: bool):
        """u = W h (acc precision) → z and f'; without soft-capping f' is the constant scale, kept a
        float on chunks to save an [N, chunk] tensor."""
        z = u * self.scale
        if self.softcap is None:
            return z, (torch.full_like(z, self.scale) if dense_fp else self.scale)
        t = torch.tanh(z / self.softcap)
        return t * self.softcap, self.scale * (1.0 - t * t)

    def logits(self, h: torch.Tensor, v0: int = 0, v1: int | None = None, acc=torch.float32):
        """Logits z[:, v0:v1] in ``acc`` precision and f' on that slice (a float when constant)."""
        w = self.weight[v0:v1]
        return self._activate((h.to(w.dtype) @ w.T).to(acc), False)

    def logits_columns(self, h: torch.Tensor, ids: torch.Tensor, acc=torch.float32):
        """z[:, ids] and f'[:, ids] for a few vocabulary ids."""
        w = self.weight[ids]
        return self._activate((h.to(w.dtype) @ w.T).to(acc), True)

    def logits_at(self, h: torch.Tensor, ids: torch.Tensor, acc=torch.float32):
        """z[n, ids[n]] and f'[n, ids[n]]: one id per token, without a vocabulary pass."""
        u = (h.to(acc) * self.weight[ids].to(acc)).sum(-1)
        return self._activate(u, True)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 softmax and accumulators whatever the model dtype; fp64 stays fp64 (oracle tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """Input dtype of the readout's large products (Ḡ h, e α'ᵀ, αᵀ h, h h'ᵀ): a 16-bit model's own dtype, so they
    run on tensor cores with fp32 accumulation like the model's layers, their results widened to fp32; fp32 and
    fp64 models keep their own precision."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else accumulation_dtype(dtype)


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
    """w_t = Ḡ_k h_t for K target statistics Ḡ [K, V, d]: the exact value of §2.1. Ḡ h runs in Ḡ's dtype
    (the caller casts Ḡ once to :func:`product_dtype`)."""

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
    """w_t = α'_s for reference tokens s (their h', y', lse' fixed): α_t·α'_s for every pair (§2.2).

    ``errors``: α' [S, V] already materialised (:meth:`ReferenceTokens.errors`, factored target statistics);
    without it each chunk of α' is recomputed from h', y', lse'. e α'ᵀ runs in :func:`product_dtype`."""

    def __init__(self, head: LMHead, ref: "ReferenceTokens", n: int, acc, errors: torch.Tensor | None = None):
        self.head, self.ref, self.acc, self.errors = head, ref, acc, errors
        self.dtype = product_dtype(ref.h.dtype) if errors is None else errors.dtype
        self.total = torch.zeros(n, ref.h.shape[0], dtype=acc, device=ref.h.device)

    def chunk(self, h, v0, v1, e):
        a = (self.errors[:, v0:v1] if self.errors is not None
             else self.ref.alpha(self.head, v0, v1, self.acc).to(self.dtype))
        self.total += (e.to(self.dtype) @ a.T).to(self.acc)

    def at_label(self, h, y):
        # α'_s[y_t] for every pair (t, s): the reference logits at the train labels.
        if self.errors is not None:
            return self.errors[:, y].T.to(self.acc)
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
        with deterministic():
            self.total.index_add_(1, self.buckets[v0:v1], e * self.signs[v0:v1])

    def at_label(self, h, y):
        # a one-hot per token in its label's bucket, carried as (bucket, sign).
        return self.buckets[y], self.signs[y]

    def finish(self, label_coef, total_coef, y):
        out = self.total * total_coef[:, None]
        b, s = self.at_label(None, y)
        out[torch.arange(len(y), device=y.device), b] += label_coef * s
        return out


class ProjectionOfError(Accumulator):
    """w_t = the rows of a fixed projection P [k, V]: P α_t, the error's coordinates in a fitted subspace."""

    def __init__(self, projection: torch.Tensor, n: int, acc):
        self.projection, self.acc = projection.to(acc), acc
        self.total = torch.zeros(n, projection.shape[0], dtype=acc, device=projection.device)

    def chunk(self, h, v0, v1, e):
        self.total += e @ self.projection[:, v0:v1].T

    def at_label(self, h, y):
        return self.projection[:, y].T


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

    def errors(self, head: LMHead, dtype: torch.dtype, chunk: int = DEFAULT_VOCAB_CHUNK,
               budget: int = READOUT_BUDGET) -> torch.Tensor:
        """α' [S, V] of every token, materialised in ``dtype``: the A of factored target statistics."""
        acc = accumulation_dtype(self.h.dtype)
        out = torch.empty(len(self.y), head.vocab_size, dtype=dtype, device=self.h.device)
        _, chunk = block_sizes(chunk, n_reference=len(self.y), budget=budget)
        for v0 in range(0, head.vocab_size, chunk):
            v1 = min(v0 + chunk, head.vocab_size)
            out[:, v0:v1] = self.alpha(head, v0, v1, acc)
        return out


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
        shift = torch.where(torch.isfinite(m_new), m_new, 0.0)  # a chunk of only −inf logits: no NaN
        r = torch.exp(m - shift)
        p = torch.exp(z - shift[:, None])
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
                          out_index: torch.Tensor, chunk: int = DEFAULT_VOCAB_CHUNK,
                          budget: int = READOUT_BUDGET) -> torch.Tensor:
    """Σ_t weights_t α_t h_tᵀ into ``n_out`` [V, d] fp32 matrices (``out_index`` picks one per token).

    This builds the target statistics Ḡ (§2.1): one matrix per group, each token weighted by
    1/(rows in its group) — and by 1/‖G(z')‖ for the cosine variant. Tokens go in blocks, so a long
    target row costs no more memory than a short one. αᵀ h runs in :func:`product_dtype`, summed in fp32.
    """
    acc, cd = accumulation_dtype(h.dtype), product_dtype(h.dtype)
    out = torch.zeros(n_out, head.vocab_size, h.shape[1], dtype=acc, device=h.device)
    hw = (h.to(acc) * weights.to(acc)[:, None]).to(cd)
    block, chunk = block_sizes(chunk, budget=budget)
    for k in range(n_out):
        sel = (out_index == k).nonzero().squeeze(1)
        for v0 in range(0, head.vocab_size, chunk):
            v1 = min(v0 + chunk, head.vocab_size)
            for t0 in range(0, len(sel), block):
                s = sel[t0:t0 + block]
                out[k, v0:v1] += (error_chunk(head, h[s], y[s], lse[s], v0, v1, acc).to(cd).T @ hw[s]).to(acc)
    return out


def segment_sum(x: torch.Tensor, seg: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """Sum the rows (dim 0) or columns (dim 1) of x that share a segment id."""
    shape = list(x.shape)
    shape[dim] = n
    with deterministic():
        return torch.zeros(shape, dtype=x.dtype, device=x.device).index_add_(dim, seg, x)


def _gram_groups(rows: list[int], counts: list[int], max_tokens: int):
    """Consecutive rows packed into groups of at most ``max_tokens`` tokens (a longer row goes alone)."""
    group, size = [], 0
    for i in rows:
        if group and size + counts[i] > max_tokens:
            yield group
            group, size = [], 0
        group.append(i)
        size += counts[i]
    if group:
        yield group


def gradient_sq_norms(head: LMHead, h, y, lse, seg, n_samples: int, chunk: int = DEFAULT_VOCAB_CHUNK,
                      budget: int = READOUT_BUDGET) -> torch.Tensor:
    """‖G(z)‖²_F per sample (the cosine variant's denominator), exactly, in memory bounded by ``budget``
    elements per intermediate whatever the row length.

    Two exact forms, chosen per row by cost (α needs each token's final log-sum-exp, so this is a second
    vocabulary pass):
    - Gram: Σ_{t,s∈z} (α_t·α_s)(h_t·h_s) — T²(V + d) multiply-adds, [T, T] memory;
    - explicit: Σ_chunks ‖Σ_t α_t[chunk] h_tᵀ‖²_F — T·V·d multiply-adds, [chunk, d] memory.
    A row takes the Gram when T(V + d) ≤ V·d (about T ≤ d) and T² ≤ budget, else the explicit form."""
    acc = accumulation_dtype(h.dtype)
    vocab, d = head.vocab_size, h.shape[1]
    counts = torch.bincount(seg, minlength=n_samples).tolist()
    gram = [0 < t and t * (vocab + d) <= vocab * d and t * t <= budget for t in counts]
    gram_rows = [i for i, t in enumerate(counts) if gram[i]]
    explicit_rows = [i for i, t in enumerate(counts) if t > 0 and not gram[i]]
    out = torch.zeros(n_samples, dtype=acc, device=h.device)
    block, _ = block_sizes(chunk, budget=budget)
    for group in _gram_groups(gram_rows, counts, block):
        members = [(seg == i).nonzero().squeeze(1) for i in group]
        idx = torch.cat(members)
        grams = [torch.zeros(len(m), len(m), dtype=acc, device=h.device) for m in members]
        c = max(1, min(chunk, budget // len(idx)))
        for v0 in range(0, vocab, c):
            a = error_chunk(head, h[idx], y[idx], lse[idx], v0, min(v0 + c, vocab), acc)
            for g, rows_a in zip(grams, a.split([len(m) for m in members])):
                g += rows_a @ rows_a.T
        for i, g, m in zip(group, grams, members):
            hs = h[m].to(acc)
            out[i] = (g * (hs @ hs.T)).sum()
    c = max(1, min(chunk, budget // d))
    tokens = max(1, budget // c)
    for i in explicit_rows:
        m = (seg == i).nonzero().squeeze(1)
        for v0 in range(0, vocab, c):
            v1 = min(v0 + c, vocab)
            g = torch.zeros(v1 - v0, d, dtype=acc, device=h.device)
            for t0 in range(0, len(m), tokens):
                s = m[t0:t0 + tokens]
                g += error_chunk(head, h[s], y[s], lse[s], v0, v1, acc).T @ h[s].to(acc)
            out[i] += (g * g).sum()
    return out
