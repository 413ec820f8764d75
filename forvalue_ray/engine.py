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
from .readout import (DEFAULT_VOCAB_CHUNK, CountSketchOfError, ReferenceTokens, TargetStatDot, TokenKernel,
                      accumulation_dtype, gradient_sq_norms, segment_sum, vocab_pass, weighted_gradient_sum)
from .sketch import SketchHashes, tensor_sketch

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
    return ValuedTokens(h=hidden[b.to(dev), t.to(dev)], y=target[b, t].to(dev), seg=b.to(dev), n_rows=len(rows))


@dataclass
class TargetStats:
    """Target statistics Ḡ [K, V, d] (fp32) with group names; ``normalize`` marks the cosine variant."""

    stats: torch.Tensor
    names: list[str]
    normalize: bool
    counts: list[int]
    provenance: dict = field(default_factory=dict)


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
                 sketch_dim: int | None = None, sketch_seed: int = 0, normalize: bool = False,
                 vocab_chunk: int = DEFAULT_VOCAB_CHUNK, max_tokens: int = DEFAULT_MAX_TOKENS,
                 padding_side: str = "right"):
        self.vm, self.normalize, self.vocab_chunk = vm, normalize, vocab_chunk
        self.max_tokens, self.padding_side = max_tokens, padding_side
        dev = vm.device
        self.stats = None if stats is None else stats.stats.to(dev)
        if stats is not None and stats.normalize != normalize:
            raise ValueError("the target statistics were built with normalize="
                             f"{stats.normalize}; score with the same setting")
        self.reference = None if reference is None else reference.to(dev)
        self.hashes = None if sketch_dim is None else SketchHashes.make(
            sketch_dim, sketch_seed, vm.head.vocab_size, vm.head.weight.shape[1], dev)

    @torch.no_grad()
    def __call__(self, rows: list[Encoded]) -> dict[str, np.ndarray]:
        """Per-row results in input order: n_tokens, nll, and scores [n, K] / pairwise [n, M] / sketch [n, dim]."""
        parts = [(idx, self._batch([rows[i] for i in idx]))
                 for idx in plan_batches([len(r.input_ids) for r in rows], self.max_tokens)]
        out = {}
        for idx, res in parts:
            for k, v in res.items():
                if k not in out:
                    out[k] = np.zeros((len(rows),) + v.shape[1:], dtype=v.dtype)
                out[k][idx] = v
        return out

    def _batch(self, rows: list[Encoded]) -> dict[str, np.ndarray]:
        head = self.vm.head
        vt = valued_tokens(self.vm, rows, self.padding_side)
        n, acc = vt.n_rows, accumulation_dtype(vt.h.dtype)
        accs = []
        if self.stats is not None:
            accs.append(TargetStatDot(self.stats, len(vt.y), acc))
        if self.reference is not None:
            accs.append(TokenKernel(head, self.reference.tokens, len(vt.y), acc))
        if self.hashes is not None:
            accs.append(CountSketchOfError(self.hashes.vocab_buckets, self.hashes.vocab_signs,
                                           self.hashes.dim, len(vt.y), acc))
        res = vocab_pass(head, vt.h, vt.y, accs, self.vocab_chunk)
        counts = vt.n_tokens
        out = {"n_tokens": counts.astype(np.int64),
               "nll": (segment_sum(res.nll, vt.seg, n).cpu().double().numpy() / np.maximum(counts, 1))}
        inv_norm = None
        if self.normalize and (self.stats is not None or self.reference is not None):
            inv_norm = gradient_sq_norms(head, vt.h, vt.y, res.lse, vt.seg, n, self.vocab_chunk).rsqrt()
        values = iter(res.values)
        if self.stats is not None:
            s = segment_sum(next(values), vt.seg, n)
            out["scores"] = (s if inv_norm is None else s * inv_norm[:, None]).double().cpu().numpy()
        if self.reference is not None:
            ref = self.reference
            kernel = next(values) * (vt.h.to(acc) @ ref.tokens.h.to(acc).T)  # (α_t·α'_s)(h_t·h'_s)
            per_pair = segment_sum(segment_sum(kernel, vt.seg, n, 0), ref.tokens.seg, len(ref.ids), 1)
            if inv_norm is not None:
                per_pair = per_pair * inv_norm[:, None] * ref.sq_norms.to(acc).rsqrt()[None, :]
            out["pairwise"] = per_pair.double().cpu().numpy()
        if self.hashes is not None:
            out["sketch"] = tensor_sketch(next(values), vt.h, self.hashes, vt.seg, n).float().cpu().numpy()
        return out


# ---- target side: additive partials so any number of workers can contribute -------------------------------


@torch.no_grad()
def target_partial(vm: ValuationModel, rows: list[Encoded], group_index: list[int], n_groups: int, *,
                   normalize: bool = False, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                   max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[torch.Tensor, np.ndarray]:
    """Σ over these rows of G(z') (÷‖G(z')‖ if normalize), per group: [K, V, d] and row counts [K]."""
    head = vm.head
    total = None
    counts = np.bincount(np.asarray(group_index, dtype=np.int64), minlength=n_groups)
    for idx in plan_batches([len(r.input_ids) for r in rows], max_tokens):
        vt = valued_tokens(vm, [rows[i] for i in idx])
        lse = vocab_pass(head, vt.h, vt.y, (), vocab_chunk).lse
        weights = torch.ones(vt.n_rows, dtype=lse.dtype, device=lse.device)
        if normalize:
            weights = gradient_sq_norms(head, vt.h, vt.y, lse, vt.seg, vt.n_rows, vocab_chunk).rsqrt()
        groups = torch.tensor([group_index[i] for i in idx], device=lse.device)
        part = weighted_gradient_sum(head, vt.h, vt.y, lse, weights[vt.seg], n_groups, groups[vt.seg], vocab_chunk)
        total = part if total is None else total + part
    return total.float().cpu(), counts


def finish_target_stats(total: torch.Tensor, counts: np.ndarray, names: list[str], normalize: bool,
                        provenance: dict | None = None) -> TargetStats:
    if (counts == 0).any():
        empty = [names[i] for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"no valid target rows in group(s) {empty}")
    stats = total / torch.as_tensor(counts, dtype=total.dtype)[:, None, None]
    return TargetStats(stats, list(names), normalize, [int(c) for c in counts], dict(provenance or {}))


@torch.no_grad()
def build_reference(vm: ValuationModel, rows: list[Encoded], *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                    max_tokens: int = DEFAULT_MAX_TOKENS) -> Reference:
    """Keep every valued token of a small target set (h', y', lse') plus each row's ‖G‖²."""
    head = vm.head
    hs, ys, lses, segs = [], [], [], []
    sq = torch.zeros(len(rows), dtype=torch.float64)
    for idx in plan_batches([len(r.input_ids) for r in rows], max_tokens):
        vt = valued_tokens(vm, [rows[i] for i in idx])
        lse = vocab_pass(head, vt.h, vt.y, (), vocab_chunk).lse
        sq[idx] = gradient_sq_norms(head, vt.h, vt.y, lse, vt.seg, vt.n_rows, vocab_chunk).double().cpu()
        hs.append(vt.h), ys.append(vt.y), lses.append(lse)
        segs.append(torch.as_tensor(idx, device=vt.seg.device)[vt.seg])
    tokens = ReferenceTokens(torch.cat(hs), torch.cat(ys), torch.cat(lses), torch.cat(segs))
    return Reference(tokens, [r.id for r in rows], sq)
