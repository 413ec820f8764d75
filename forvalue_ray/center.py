"""Centering on μ, the mean gradient of a random sample of the training corpus: the one owner of that math, used by
the in-memory API and by the job alike.

- target statistics: Ḡ_k − μ (:func:`center_target_stats`);
- a sketch index: each row keeps c = TS(G) − TS(μ) and the exact ⟨G, μ⟩ (:func:`center_terms`,
  :func:`centered_sketch_rows`; the estimators that add the terms back are in :mod:`~forvalue_ray.sketch`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .engine import TargetStats
from .sketch import SketchHashes, sketch_of_matrix
from .subspace import Subspace

CENTER_NORMALIZE_ERROR = ("centering is defined for the plain For-Value inner product only: drop normalize "
                          "(--normalize) or the centering sample (center= / --center)")


def check_center(center: TargetStats) -> None:
    """A centering μ is the plain mean gradient of one sample, kept dense."""
    if center.normalize:
        raise ValueError(CENTER_NORMALIZE_ERROR)
    if len(center.names) != 1:
        raise ValueError(f"centering statistics must have one group, got {len(center.names)} ({center.names[:5]})")
    if center.form == "factored":
        raise ValueError("centering needs dense statistics: build them with target_statistics(..., "
                         "stats_form='dense') (the job's OUT/center is dense)")


def center_target_stats(stats: TargetStats, center: TargetStats) -> TargetStats:
    """Ḡ_k − μ for every group k, μ the mean gradient of a sample of the training corpus (one group).

    A row's score against it, ⟨G, Ḡ_k − μ⟩ = value against the targets − value against the sample, differs
    from the centered inner product ⟨G − μ, Ḡ_k − μ⟩ by ⟨μ, Ḡ_k − μ⟩, the same for every row: the ranking
    of the centered score. What every row shares (a prompt template, the corpus's common style) drops out.
    """
    check_center(center)
    if stats.normalize:
        raise ValueError(CENTER_NORMALIZE_ERROR)
    if stats.form == "factored":
        raise ValueError("centering needs dense statistics: build both with target_statistics(..., "
                         "stats_form='dense')")
    if center.stats.shape[1:] != stats.stats.shape[1:]:
        raise ValueError(f"centering statistics of shape {tuple(center.stats.shape[1:])} do not match the target "
                         f"statistics' {tuple(stats.stats.shape[1:])}: build both with the same model")
    return TargetStats(stats.stats - center.stats[0], stats.names, False, stats.counts,
                       {**stats.provenance, "centered_on": {"rows": center.counts[0], **center.provenance}})


class CenteredSketches(NamedTuple):
    """A centered sketch index in memory: c = TS(G) − TS(μ) per row, the exact ⟨G, μ⟩ per row, and ‖μ‖²."""

    sketch: np.ndarray  # [n, dim] float32
    center_dot: np.ndarray  # [n] float64
    center_sq_norm: float


def center_terms(mu: torch.Tensor, hashes: SketchHashes, subspace: Subspace | None = None) -> tuple[np.ndarray, float]:
    """What centering on μ [V, d] subtracts and adds: μ's stored vector as float32 (the dtype of a row's sketch:
    TS(μ), or with a subspace [A μ Bᵀ, TS(μ − Π_A μ Π_B)]) and ‖μ‖²."""
    vector = sketch_of_matrix(mu, hashes).float().numpy() if subspace is None else subspace.center_vector(mu, hashes)
    return vector, float(mu.double().pow(2).sum())


def centered_sketch_rows(scored: dict, terms: tuple[np.ndarray, float]) -> CenteredSketches:
    """The centered index rows from a :class:`~forvalue_ray.engine.Scorer` pass that sketched the rows and scored
    them against μ (its "sketch" TS(G) and "scores" ⟨G, μ⟩), given μ's :func:`center_terms` (computed once per μ
    and sketch seed)."""
    mu_sketch, mu_sq_norm = terms
    return CenteredSketches(scored["sketch"] - mu_sketch, scored["scores"][:, 0], mu_sq_norm)
