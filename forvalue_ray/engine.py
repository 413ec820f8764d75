"""Batches of encoded rows → exact For-Value quantities. Pure torch; the Ray layer calls :class:`Scorer`.

Three products of a batch, all through one vocabulary pass of :mod:`forvalue_ray.readout`:

- *target statistics* (:class:`TargetStats`): Ḡ_k = mean over the rows of group k of G(z') (or of
  G(z')/‖G(z')‖ for the cosine variant), built from additive partial sums so any number of workers can
  contribute blocks;
- *reference tokens* (:class:`Reference`): a small target set's valued tokens for pairwise scores;
- *scores / sketches* of training rows (:class:`Scorer`).

Every per-row result depends only on that row: rows are batched by a token budget, but hidden states
are taken at each row's own valued positions and every reduction is per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .encode import IGNORE, Encoded
from .model import ValuationModel
from .readout import (DEFAULT_VOCAB_CHUNK, CountSketchOfError, ProjectionOfError, ReferenceTokens, TargetStatDot,
                      TokenKernel, accumulation_dtype, block_sizes, gradient_sq_norms, product_dtype, segment_sum,
                      vocab_pass, weighted_gradient_sum)
from .sketch import SketchHashes, sketch_spectrum, spectrum_to_sketch
from .subspace import Subspace, fit_rows, fit_subspace

DEFAULT_MAX_TOKENS = 4096  # padded tokens per forward
DEFAULT_MAX_ROWS = 64


def plan_batches(lengths, max_tokens: int = DEFAULT_MAX_TOKENS, max_rows: int = DEFAULT_MAX_ROWS):
    """Group row indices into batches of similar length whose padded size stays within ``max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch, longest = [], 0
    for i in order:
        longest_if = max(longest, lengths[i])
        if batch and (longest_if * (len(batch) + 1) > max_tokens or len(batch) >= max_rows):
            yield batch
            batch, longest_if = [], lengths[i]
        batch.append(i)
        longest = longest_if
    if batch:
        yield batch


@dataclass
class ValuedTokens:
    """The valued tokens of a batch, flattened: hidden states, labels, owning row."""

    h: torch.Tensor  # [N, d] model dtype
    y: torch.Tensor  # [N]
    seg: torch.Tensor  # [N]
    n_rows: int
    pos: torch.Tensor | None = None  # [N] each label's position in its row's input_ids (on the CPU)

    @property
    def n_tokens(self) -> np.ndarray:
        return np.bincount(self.seg.cpu().numpy(), minlength=self.n_rows)


def valued_tokens(vm: ValuationModel, rows: list[Encoded], padding_side: str = "right") -> ValuedTokens:
    """Run the model on a padded batch and keep the hidden state before each valued label."""
    longest = max(len(r.input_ids) for r in rows)
    if vm.is_vision:
        padding_side = "right"  # image-text models derive positions from the mask: keep real tokens first
    pad_id = 0
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        sl = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        ids[i, sl] = torch.as_tensor(np.array(r.input_ids))
        labels[i, sl] = torch.as_tensor(np.array(r.labels))
        mask[i, sl] = 1
    vision = {}
    if any(r.vision for r in rows):
        from .vision import collate_vision

        vision = collate_vision([r.vision for r in rows], longest)
    hidden = vm.hidden_states(ids, mask, **vision)
    # label at j is predicted from position j-1 (within the row: labels of the first real token are IGNORE
    # for text rows, and a left-padded row's first real position has no real predecessor)
    target = labels[:, 1:]
    valid = (target != IGNORE) & (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    b, t = valid.nonzero(as_tuple=True)
    dev = hidden.device
    offset = torch.tensor([longest - len(r.input_ids) if padding_side == "left" else 0 for r in rows])
    return ValuedTokens(h=hidden[b.to(dev), t.to(dev)], y=target[b, t].to(dev), seg=b.to(dev), n_rows=len(rows),
                        pos=t + 1 - offset[b])


@dataclass
class TargetTokens:
    """Valued target tokens (h', y', lse'; ``seg`` = the group of each token's row) with the weight w_s each
    carries in Ḡ: Ḡ_k = Σ_{s∈k} w_s α'_s h'_sᵀ. Partials of a target pass add by concatenation."""

    tokens: ReferenceTokens
    weights: torch.Tensor  # [S]

    def __add__(self, other: "TargetTokens") -> "TargetTokens":
        a, b = self.tokens, other.tokens
        return TargetTokens(ReferenceTokens(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in ("h", "y", "lse", "seg"))),
                            torch.cat([self.weights, other.weights]))

    def cpu(self) -> "TargetTokens":
        t = self.tokens
        return TargetTokens(ReferenceTokens(t.h.cpu(), t.y.cpu(), t.lse.cpu(), t.seg.cpu()), self.weights.cpu())


def target_form(n_tokens: int, n_groups: int, vocab_size: int, hidden_size: int) -> str:
    """How to keep K target statistics built from S valued target tokens. Ḡ_k = Σ_{s∈k} w_s α'_s h'_sᵀ has rank
    ≤ S, so Ḡ h = A (Bᵀ h) with A = α' [V, S], B = w h' [d, S]: per scored token 2·S·(V + d) FLOPs and S·(V + d)
    values kept, against 2·K·V·d and K·V·d dense — one inequality decides both."""
    return "factored" if n_tokens * (vocab_size + hidden_size) < n_groups * vocab_size * hidden_size else "dense"


@dataclass
class TargetStats:
    """K target statistics Ḡ_k with group names (``normalize`` marks the cosine variant), in one of two exact
    forms (:func:`target_form`): ``stats`` [K, V, d] fp32 (dense), or ``tokens`` (factored: the target's valued
    tokens and their weights, 1/(rows in the group) and 1/‖G(z')‖ for cosine)."""

    stats: torch.Tensor | None
    names: list[str]
    normalize: bool
    counts: list[int]
    provenance: dict = field(default_factory=dict)
    tokens: TargetTokens | None = None

    @property
    def form(self) -> str:
        return "dense" if self.stats is not None else "factored"


@dataclass
class TokenSet:
    """Target tokens on the scoring device for Σ_{t∈row} Σ_{s∈owner} (α_t·α'_s)(h_t·b_s): the pairwise
    reference (b = h', owner = target row) and factored statistics (b = w h', owner = group; α' materialised
    once, ``errors``)."""

    tokens: ReferenceTokens
    b: torch.Tensor  # [S, d] in the product dtype
    n_owners: int
    errors: torch.Tensor | None = None  # α' [S, V], or None: recomputed chunk by chunk

    def kernel(self, head, n: int, acc) -> TokenKernel:
        return TokenKernel(head, self.tokens, n, acc, self.errors)

    def reduce(self, kernel: torch.Tensor, h: torch.Tensor, seg: torch.Tensor, n_rows: int) -> torch.Tensor:
        """[n_rows, n_owners] from the [tokens, S] kernel α_t·α'_s of a token block."""
        hb = (h.to(self.b.dtype) @ self.b.T).to(kernel.dtype)
        return segment_sum(segment_sum(kernel * hb, seg, n_rows, 0), self.tokens.seg, self.n_owners, 1)

    def per_token(self, kernel: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """[tokens, n_owners]: each token's own term, before :meth:`reduce` sums them per row."""
        hb = (h.to(self.b.dtype) @ self.b.T).to(kernel.dtype)
        return segment_sum(kernel * hb, self.tokens.seg, self.n_owners, 1)


@dataclass
class Reference:
    """A small target set kept token by token, for pairwise scores."""

    tokens: ReferenceTokens
    ids: list[str]
    sq_norms: torch.Tensor  # [n_targets] ‖G(z')‖²

    def to(self, device) -> "Reference":
        t = self.tokens
        return Reference(ReferenceTokens(t.h.to(device), t.y.to(device), t.lse.to(device), t.seg.to(device)),
                         self.ids, self.sq_norms.to(device))


class Scorer:
    """Scores batches of encoded rows against target statistics, a reference set, and/or sketches them."""

    def __init__(self, vm: ValuationModel, *, stats: TargetStats | None = None, reference: Reference | None = None,
                 sketch_dim: int | None = None, sketch_seed: int = 0, subspace: Subspace | None = None,
                 normalize: bool = False, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                 max_tokens: int = DEFAULT_MAX_TOKENS, padding_side: str = "right"):
        self.vm, self.normalize, self.vocab_chunk = vm, normalize, vocab_chunk
        self.max_tokens, self.padding_side = max_tokens, padding_side
        dev, cd = vm.device, product_dtype(vm.dtype)
        if stats is not None and stats.normalize != normalize:
            raise ValueError("the target statistics were built with normalize="
                             f"{stats.normalize}; score with the same setting")
        self.target_form = None if stats is None else stats.form
        self.stats = self.factored = self.pairs = None
        if self.target_form == "dense":
            self.stats = stats.stats.to(dev, cd)  # cast once here, not per chunk
        elif self.target_form == "factored":
            t = stats.tokens.tokens
            tokens = ReferenceTokens(t.h.to(dev), t.y.to(dev), t.lse.to(dev), t.seg.to(dev))
            b = (tokens.h.to(accumulation_dtype(vm.dtype)) * stats.tokens.weights.to(dev)[:, None]).to(cd)
            self.factored = TokenSet(tokens, b, len(stats.names), tokens.errors(vm.head, cd, vocab_chunk))
        self.reference = None if reference is None else reference.to(dev)
        self.target_embeddings = None
        if self.reference is not None:
            t = self.reference.tokens
            self.pairs = TokenSet(t, t.h.to(cd), len(self.reference.ids))
            # the cosines are one small [n, d] x [d, M] product per batch: float64 on the host, so the model's
            # products stay in its own dtype and a 16-bit model's cosines do not tie
            self.target_embeddings = row_embeddings(t.h[:, :vm.head.hidden_size], t.seg,
                                                    len(self.reference.ids)).double().cpu().numpy()
        self.hashes = None if sketch_dim is None else SketchHashes.make(
            sketch_dim, sketch_seed, vm.head.vocab_size, vm.head.weight.shape[1], dev)
        if subspace is not None and self.hashes is None:
            raise ValueError("a subspace index sketches the residual: give sketch_dim too")
        # a subspace index: each row is [A G Bᵀ, TS(G − Π_A G Π_B)] (see forvalue_ray.subspace)
        self.subspace = None if subspace is None else subspace.to(dev)
        self.cs_vocab_basis = None if subspace is None else self.subspace.sketched_vocab_basis(self.hashes)

    @torch.no_grad()
    def __call__(self, rows: list[Encoded]) -> dict[str, np.ndarray]:
        """Per-row results in input order: n_tokens, nll, and scores [n, K] / pairwise [n, M] with embed [n, M]
        (cosine of the row's and each target row's :func:`row_embeddings`) / sketch [n, dim]."""
        parts = [(idx, self._batch([rows[i] for i in idx]))
                 for idx in plan_batches([len(r.input_ids) for r in rows], self.max_tokens)]
        out = {}
        for idx, res in parts:
            for k, v in res.items():
                if k not in out:
                    out[k] = np.zeros((len(rows),) + v.shape[1:], dtype=v.dtype)
                out[k][idx] = v
        return out

    @torch.no_grad()
    def token_terms(self, rows: list[Encoded]) -> dict:
        """:meth:`__call__`'s results plus each token's own term of its row's scores, before the sum over the row:
        ``token_scores`` / ``token_pairwise``, one float64 array [len(input_ids), K] per row (0 at positions that
        are not valued), whose sum over tokens is the row's ``scores`` / ``pairwise`` (cosine: already divided by
        the norms, as the scores are). Same readout, same blocks: memory as in :meth:`__call__` plus the output."""
        out: dict = {}
        for idx in plan_batches([len(r.input_ids) for r in rows], self.max_tokens):
            res = self._batch([rows[i] for i in idx], per_token=True)
            for k, v in res.items():
                if k.startswith("token_"):
                    out.setdefault(k, [None] * len(rows))
                    for j, i in enumerate(idx):
                        out[k][i] = v[j]
                else:
                    if k not in out:
                        out[k] = np.zeros((len(rows),) + v.shape[1:], dtype=v.dtype)
                    out[k][idx] = v
        return out

    def _batch(self, rows: list[Encoded], per_token: bool = False) -> dict[str, np.ndarray]:
        """One forward, then the readout over token blocks: every quantity is per token and reduced per
        row, so blocks change nothing but the peak memory (bounded whatever the row length). ``per_token``: also
        each token's terms before that reduction (:meth:`token_terms`)."""
        head = self.vm.head
        vt = valued_tokens(self.vm, rows, self.padding_side)
        n, acc = vt.n_rows, accumulation_dtype(vt.h.dtype)
        ref = self.reference
        token_sets = [t for t in (self.factored, self.pairs) if t is not None]
        block, chunk = block_sizes(self.vocab_chunk, n_groups=0 if self.stats is None else self.stats.shape[0],
                                   n_reference=sum(len(t.tokens.y) for t in token_sets),
                                   sketch_dim=0 if self.hashes is None else self.hashes.dim)
        nll = torch.zeros(n, dtype=acc, device=vt.h.device)
        scores = pairwise = spectrum = coords = None
        lse, terms = [], {"scores": [], "pairwise": []}  # per block, per_token only
        for t0 in range(0, len(vt.y), block):
            h, y, seg = vt.h[t0:t0 + block], vt.y[t0:t0 + block], vt.seg[t0:t0 + block]
            accs = []
            if self.stats is not None:
                accs.append(TargetStatDot(self.stats, len(y), acc))
            accs += [t.kernel(head, len(y), acc) for t in token_sets]
            if self.hashes is not None:
                accs.append(CountSketchOfError(self.hashes.vocab_buckets, self.hashes.vocab_signs,
                                               self.hashes.dim, len(y), acc))
            if self.subspace is not None:
                accs.append(ProjectionOfError(self.subspace.vocab, len(y), acc))
            res = vocab_pass(head, h, y, accs, chunk)
            lse.append(res.lse)
            nll += segment_sum(res.nll, seg, n)
            values = iter(res.values)
            if self.stats is not None:
                v = next(values)
                scores = _add(scores, segment_sum(v, seg, n))
                if per_token:
                    terms["scores"].append(v)
            if self.factored is not None:
                v = next(values)
                scores = _add(scores, self.factored.reduce(v, h, seg, n))
                if per_token:
                    terms["scores"].append(self.factored.per_token(v, h))
            if self.pairs is not None:
                v = next(values)
                pairwise = _add(pairwise, self.pairs.reduce(v, h, seg, n))
                if per_token:
                    terms["pairwise"].append(self.pairs.per_token(v, h))
            if self.hashes is not None:
                spectrum = _add(spectrum, sketch_spectrum(next(values), h, self.hashes, seg, n))
            if self.subspace is not None:
                coords, spectrum = self._subspace_terms(next(values), h, seg, n, coords, spectrum)
        counts = vt.n_tokens
        out = {"n_tokens": counts.astype(np.int64), "nll": nll.cpu().double().numpy() / np.maximum(counts, 1)}
        inv_norm = None
        if self.normalize and (self.target_form is not None or ref is not None):
            inv_norm = gradient_sq_norms(head, vt.h, vt.y, torch.cat(lse), vt.seg, n, self.vocab_chunk).rsqrt()
        if self.target_form is not None:
            out["scores"] = (scores if inv_norm is None else scores * inv_norm[:, None]).double().cpu().numpy()
        if ref is not None:
            if inv_norm is not None:
                pairwise = pairwise * inv_norm[:, None] * ref.sq_norms.to(acc).rsqrt()[None, :]
            out["pairwise"] = pairwise.double().cpu().numpy()
            e = row_embeddings(vt.h[:, :head.hidden_size], vt.seg, n)
            out["embed"] = e.double().cpu().numpy() @ self.target_embeddings.T
        if self.hashes is not None:
            sketch = spectrum_to_sketch(spectrum, self.hashes)
            if coords is not None:
                sketch = torch.cat([coords.to(sketch.dtype), sketch], 1)
            out["sketch"] = sketch.float().cpu().numpy()
        if per_token:
            for kind, blocks in terms.items():
                if not blocks:
                    continue
                t = torch.cat(blocks)
                if inv_norm is not None:
                    t = t * inv_norm[vt.seg][:, None]
                    if kind == "pairwise":
                        t = t * ref.sq_norms.to(acc).rsqrt()[None, :]
                out["token_" + kind] = _per_row(t.double().cpu().numpy(), vt, rows)
        return out


    def _subspace_terms(self, pa, h, seg, n, coords, spectrum):
        """Add one token block's A G Bᵀ (from P α = ``pa`` [T, k1] and B h) to ``coords`` and subtract the sketch of
        its projected part, TS(Σ_t Π_A α_t (Π_B h_t)ᵀ), from ``spectrum``: the row keeps the residual's sketch."""
        hb = h.to(pa.dtype) @ self.subspace.hidden.to(pa.dtype).T  # [T, k2]
        coords = _add(coords, segment_sum((pa[:, :, None] * hb[:, None, :]).flatten(1), seg, n))
        projected_error = pa @ self.cs_vocab_basis.to(pa.dtype).T  # CS₁(Aᵀ P α_t) [T, dim]
        projected_h = hb @ self.subspace.hidden.to(pa.dtype)
        return coords, spectrum - sketch_spectrum(projected_error, projected_h, self.hashes, seg, n)


def row_embeddings(h: torch.Tensor, seg: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_rows, d] each row's final hidden state averaged over its valued positions (the states that predict its
    response), scaled to unit length: the representation an embedding-similarity selection (RDS) compares by
    cosine. A by-product of the forward every score already runs."""
    acc = accumulation_dtype(h.dtype)
    counts = torch.bincount(seg, minlength=n_rows).clamp(min=1).to(acc)
    mean = segment_sum(h.to(acc), seg, n_rows) / counts[:, None]
    return mean / mean.norm(dim=1, keepdim=True).clamp(min=torch.finfo(acc).tiny)


def _add(total, x):
    return x if total is None else total + x


def _per_row(t: np.ndarray, vt: ValuedTokens, rows: list[Encoded]) -> list[np.ndarray]:
    """[valued tokens, K] → one [len(input_ids), K] array per row, each token's term at its position."""
    out = [np.zeros((len(r.input_ids), t.shape[1])) for r in rows]
    seg, pos = vt.seg.cpu().numpy(), vt.pos.numpy()
    for i, o in enumerate(out):
        mine = seg == i
        o[pos[mine]] = t[mine]
    return out


def fit_subspace_on_rows(vm: ValuationModel, rows: list[Encoded], mu: torch.Tensor, k1: int, k2: int,
                        vocab_chunk: int = DEFAULT_VOCAB_CHUNK, max_tokens: int = DEFAULT_MAX_TOKENS) -> Subspace:
    """:func:`~forvalue_ray.subspace.fit_subspace` on the first :func:`~forvalue_ray.subspace.fit_rows` rows of a
    sample (already random) whose mean gradient is ``mu``."""
    rows = rows[:fit_rows(k2)]
    hs, ys, lses, segs = [], [], [], []
    with torch.no_grad():
        for idx in plan_batches([len(r.input_ids) for r in rows], max_tokens):
            vt = valued_tokens(vm, [rows[i] for i in idx])
            hs.append(vt.h)
            ys.append(vt.y)
            lses.append(log_sum_exp(vm, vt, vocab_chunk))
            segs.append(torch.as_tensor(np.asarray(idx), device=vt.seg.device)[vt.seg])
        return fit_subspace(vm.head, torch.cat(hs), torch.cat(ys), torch.cat(lses), torch.cat(segs), len(rows),
                            mu.to(vm.device), k1, k2, vocab_chunk)


def log_sum_exp(vm: ValuationModel, vt: ValuedTokens, vocab_chunk: int) -> torch.Tensor:
    """Each valued token's log-sum-exp of the logits, token block by token block (bounded memory)."""
    block, chunk = block_sizes(vocab_chunk)
    return torch.cat([vocab_pass(vm.head, vt.h[t0:t0 + block], vt.y[t0:t0 + block], (), chunk).lse
                      for t0 in range(0, len(vt.y), block)])


# ---- target side: additive partials so any number of workers can contribute -------------------------------


NON_FINITE_TARGET = ("non-finite target statistics: numerical overflow in the model (try float32, bfloat16 or "
                     "another --attn-implementation)")


def _finite_rows(vt: ValuedTokens, lse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[rows] bool: every valued token of the row has finite hidden states, log-sum-exp and weight."""
    tok = torch.isfinite(vt.h).all(1) & torch.isfinite(lse) & torch.isfinite(weights[vt.seg])
    bad = torch.zeros(vt.n_rows, dtype=torch.long, device=tok.device).index_add_(0, vt.seg, (~tok).long())
    return bad == 0


def _all_finite(part) -> bool:
    if isinstance(part, TargetTokens):
        t = part.tokens
        return bool(torch.isfinite(t.h).all() and torch.isfinite(t.lse).all() and torch.isfinite(part.weights).all())
    return bool(torch.isfinite(part).all())


def _reject_target_rows(bad: list[tuple[int, str, str]], rejected: list | None) -> None:
    """Bad target rows go to ``rejected`` (the job: the target's rejected rows); without it they raise, naming
    the first (the Python API: never a silent NaN)."""
    if rejected is None:
        from .encode import RowError

        i, rid, reason = bad[0]
        raise RowError(f"target row {i} (id {rid!r}): {reason}")
    rejected += bad


@torch.no_grad()
def target_partial(vm: ValuationModel, rows: list[Encoded], group_index: list[int], n_groups: int, *,
                   normalize: bool = False, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                   max_tokens: int = DEFAULT_MAX_TOKENS, stats_form: str = "dense",
                   rejected: list | None = None, first_row: int = 0):
    """Σ over these rows of G(z') (÷‖G(z')‖ if normalize), per group, and row counts [K]. ``stats_form`` "dense":
    [K, V, d] float64 (batches summed in float64 in a fixed order, so partials reduce to the same bits however
    they are distributed); "factored": the rows' :class:`TargetTokens` (see :func:`target_form`).

    A row whose statistics are not finite (an overflow in the model) is left out of the sum and its count:
    appended to ``rejected`` as (first_row + its index, id, reason), or, without ``rejected``, raised as a
    :class:`~forvalue_ray.encode.RowError` naming it. None of these rows valid: (None, zero counts)."""
    counts = np.bincount(np.asarray(group_index, dtype=np.int64), minlength=n_groups)
    total, bad = None, []

    def batch_part(idx):
        vt = valued_tokens(vm, [rows[i] for i in idx])
        lse = log_sum_exp(vm, vt, vocab_chunk)
        weights = torch.ones(vt.n_rows, dtype=lse.dtype, device=lse.device)
        if normalize:
            weights = gradient_sq_norms(vm.head, vt.h, vt.y, lse, vt.seg, vt.n_rows, vocab_chunk).rsqrt()
        ok = _finite_rows(vt, lse, weights)
        groups = torch.tensor([group_index[i] for i in idx], device=lse.device)
        if stats_form == "factored":
            part = TargetTokens(ReferenceTokens(vt.h, vt.y, lse, groups[vt.seg]), weights[vt.seg])
        else:
            part = weighted_gradient_sum(vm.head, vt.h, vt.y, lse, weights[vt.seg], n_groups, groups[vt.seg],
                                         vocab_chunk).double()
        return part, bool(ok.all()) and _all_finite(part)

    for idx in plan_batches([len(r.input_ids) for r in rows], max_tokens):
        part, finite = batch_part(idx)
        if not finite:  # find the rows that overflow: each of this batch's rows on its own
            part = None
            for i in idx:
                one, ok = batch_part([i])
                if ok:
                    part = one if part is None else part + one
                else:
                    bad.append((first_row + i, rows[i].id, NON_FINITE_TARGET))
                    counts[group_index[i]] -= 1
        if part is not None:
            total = part if total is None else total + part
    if bad:
        _reject_target_rows(bad, rejected)
    return (None if total is None else total.cpu()), counts


def finish_target_stats(total, counts: np.ndarray, names: list[str], normalize: bool,
                        provenance: dict | None = None, dtype: torch.dtype | None = None,
                        drop_empty: bool = False) -> TargetStats:
    """Ḡ_k = the summed partials of group k ÷ its row count, in the partials' form. Dense statistics are kept in
    float32, or float64 for a float64 model (``dtype``): an fp64 model computes in fp64 end to end.
    ``drop_empty``: groups left without a row (every row rejected) are dropped instead of refused."""
    counts = np.array(counts)  # a writable copy: the counts may come read-only out of Ray's object store
    if (counts == 0).any():
        empty = [names[i] for i in np.flatnonzero(counts == 0)]
        if not drop_empty or total is None or len(empty) == len(names):
            raise ValueError(f"no valid target rows in group(s) {empty}")
        keep = np.flatnonzero(counts > 0)
        names, counts = [names[i] for i in keep], counts[keep]
        if isinstance(total, TargetTokens):
            remap = torch.full((int(max(keep)) + 1 if len(keep) else 1,), -1, dtype=torch.long)
            remap[torch.as_tensor(keep)] = torch.arange(len(keep))
            t = total.tokens
            total = TargetTokens(ReferenceTokens(t.h, t.y, t.lse, remap[t.seg]), total.weights)
        else:
            total = total[torch.as_tensor(keep)]
    meta = (list(names), normalize, [int(c) for c in counts], dict(provenance or {}))
    if isinstance(total, TargetTokens):
        w = total.weights / torch.as_tensor(counts, dtype=total.weights.dtype)[total.tokens.seg]
        return TargetStats(None, *meta, tokens=TargetTokens(total.tokens, w))
    mean = total / torch.as_tensor(counts, dtype=total.dtype)[:, None, None]
    return TargetStats(mean.to(torch.float64 if dtype == torch.float64 else torch.float32), *meta)


@torch.no_grad()
def build_reference(vm: ValuationModel, rows: list[Encoded], *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                    max_tokens: int = DEFAULT_MAX_TOKENS, rejected: list | None = None,
                    first_row: int = 0) -> Reference:
    """Keep every valued token of a small target set (h', y', lse') plus each row's ‖G‖². A row whose numbers are
    not finite is left out (``rejected``, or raised: see :func:`target_partial`); the others keep their order."""
    head = vm.head
    kept: dict[int, tuple] = {}
    bad = []
    for idx in plan_batches([len(r.input_ids) for r in rows], max_tokens):
        vt = valued_tokens(vm, [rows[i] for i in idx])
        lse = log_sum_exp(vm, vt, vocab_chunk)
        sq = gradient_sq_norms(head, vt.h, vt.y, lse, vt.seg, vt.n_rows, vocab_chunk)
        ok = (_finite_rows(vt, lse, torch.ones_like(lse)) & torch.isfinite(sq)).tolist()
        for j, i in enumerate(idx):
            if not ok[j]:
                bad.append((first_row + i, rows[i].id, NON_FINITE_TARGET))
                continue
            m = vt.seg == j
            kept[i] = (vt.h[m], vt.y[m], lse[m], float(sq[j].double()))
    if bad:
        _reject_target_rows(bad, rejected)
    order = sorted(kept)
    hs, ys, lses, segs = [], [], [], []
    for k, i in enumerate(order):
        h, y, lse, _ = kept[i]
        hs.append(h), ys.append(y), lses.append(lse)
        segs.append(torch.full((len(y),), k, dtype=torch.long, device=y.device))
    if not order:
        d = head.weight.shape[1]
        dev = head.weight.device
        empty = ReferenceTokens(torch.zeros(0, d, dtype=head.weight.dtype, device=dev),
                                torch.zeros(0, dtype=torch.long, device=dev),
                                torch.zeros(0, dtype=accumulation_dtype(head.weight.dtype), device=dev),
                                torch.zeros(0, dtype=torch.long, device=dev))
        return Reference(empty, [], torch.zeros(0, dtype=torch.float64))
    tokens = ReferenceTokens(torch.cat(hs), torch.cat(ys), torch.cat(lses), torch.cat(segs))
    return Reference(tokens, [rows[i].id for i in order], torch.tensor([kept[i][3] for i in order],
                                                                        dtype=torch.float64))


def join_references(parts) -> Reference:
    """One reference from per-block references (each given with the index of its first row), in block order;
    a block's rows are numbered after all rows kept by the blocks before it."""
    refs = [p for p, _ in parts]
    offsets = np.cumsum([0] + [len(r.ids) for r in refs])[:-1]
    seg = torch.cat([r.tokens.seg + int(o) for r, o in zip(refs, offsets)])
    t = [r.tokens for r in refs]
    return Reference(ReferenceTokens(torch.cat([x.h for x in t]), torch.cat([x.y for x in t]),
                                     torch.cat([x.lse for x in t]), seg),
                     [i for r in refs for i in r.ids], torch.cat([r.sq_norms for r in refs]))
