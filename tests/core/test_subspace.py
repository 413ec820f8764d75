"""The fitted-subspace index (forvalue_ray.subspace): its fit against an eigen-decomposition of the autograd
gradients, each stored row against [A X Bᵀ, TS(X − Π_A X Π_B)] built from those gradients, and the estimate's
unbiasedness over hash seeds."""

import numpy as np
import pytest
import torch

from forvalue_ray import (centered_sketches, encode_rows, fit_subspace, pairwise_scores, score_sketches,
                          sketch_targets, target_statistics)
from forvalue_ray.sketch import SketchHashes, sketch_of_matrix
from forvalue_ray.subspace import parse_shape
from forvalue_ray.testing.tiny import oracle_gradients, tiny_model

ROWS = [{"text": t} for t in [
    "the cat sat on the mat", "a dog ran in the park", "cats and dogs are pets", "2 + 2 = 4 and 3 + 3 = 6",
    "12 * 12 = 144", "the sun is hot today", "rain falls on the green hills", "def f(x): return x + 1",
    "print('hello, world')", "zebras run fast!"]]
TARGET = [{"text": t} for t in ["a cat on a mat", "7 + 5 = 12", "the dog in the park"]]
SAMPLE = ROWS[:6]
SHAPE = (5, 3)


@pytest.fixture(scope="module")
def vm():
    return tiny_model("llama")  # float64: the fit and the rows are checked at float32 output precision


@pytest.fixture(scope="module")
def fitted(vm):
    mu = target_statistics(vm, SAMPLE, stats_form="dense")
    return mu, fit_subspace(vm, SAMPLE, mu, shape=SHAPE)


def gradients(vm, rows) -> torch.Tensor:
    V, d = vm.head.vocab_size, vm.head.weight.shape[1]
    return oracle_gradients(vm, encode_rows(vm, rows)).reshape(len(rows), V, d)


def projector(m: torch.Tensor) -> torch.Tensor:
    m = m.double()
    return m.T @ m


def test_fit_is_the_two_sided_principal_subspace_of_the_centered_sample(vm, fitted):
    """B spans the top eigenvectors of Σ_i (G_i − μ)ᵀ(G_i − μ); A the top left singular vectors of the stacked
    (G_i − μ)Bᵀ — computed here from the dense autograd gradients, compared as projectors (sign-free)."""
    mu, sub = fitted
    x = gradients(vm, SAMPLE) - gradients(vm, SAMPLE).mean(0)
    np.testing.assert_allclose(mu.stats[0].numpy(), gradients(vm, SAMPLE).mean(0).numpy(), atol=1e-6)
    k1, k2 = SHAPE
    evals, evecs = torch.linalg.eigh(sum(xi.T @ xi for xi in x))
    assert evals[-k2] - evals[-k2 - 1] > 1e-3 * evals[-1]  # a gap: the subspace is well defined
    b_ref = evecs[:, -k2:].T
    u, s, _ = torch.linalg.svd(torch.cat([xi @ b_ref.T for xi in x], 1), full_matrices=False)
    a_ref = u[:, :k1].T
    for got, ref in ((sub.hidden, b_ref), (sub.vocab, a_ref)):
        np.testing.assert_allclose(got.double() @ got.double().T, np.eye(len(got)), atol=1e-6)  # orthonormal rows
        np.testing.assert_allclose(projector(got), projector(ref), atol=1e-5)
    assert sub.vocab.shape == (k1, vm.head.vocab_size) and sub.hidden.shape == (k2, vm.head.weight.shape[1])
    assert fit_subspace(vm, SAMPLE, mu, shape="5x3").id() == sub.id()  # deterministic


def test_rows_are_exact_coordinates_plus_the_residual_sketch(vm, fitted):
    """Each stored row is [A X Bᵀ, TS(X) − TS(Π_A X Π_B)] for X = G − μ, built here from the autograd gradients
    (the residual's sketch by sketch_of_matrix, a second code path); ⟨G, μ⟩ and ‖μ‖² are exact."""
    mu, sub = fitted
    dim = 48
    got = centered_sketches(vm, ROWS, mu, dim=dim, seed=3, subspace=sub)
    hashes = SketchHashes.make(dim, 3, vm.head.vocab_size, vm.head.weight.shape[1])
    a, b = sub.vocab.double(), sub.hidden.double()
    g = gradients(vm, ROWS)
    m = mu.stats[0].double()
    for i, gi in enumerate(g):
        x = gi - m
        coords = a @ x @ b.T
        residual = sketch_of_matrix(x, hashes) - sketch_of_matrix(a.T @ coords @ b, hashes)
        want = torch.cat([coords.reshape(-1), residual]).numpy()
        np.testing.assert_allclose(got.sketch[i], want, atol=2e-6 * np.abs(want).max(), rtol=1e-5)
        assert got.center_dot[i] == pytest.approx(float((gi * m).sum()), rel=1e-9)
    assert got.sketch.shape == (len(ROWS), SHAPE[0] * SHAPE[1] + dim)
    assert got.center_sq_norm == pytest.approx(float(m.pow(2).sum()), rel=1e-12)


def test_estimate_is_unbiased_over_hash_seeds(vm, fitted):
    """Over 60 seeds, the subspace index's estimate of every (row, target) pair averages to the exact pairwise
    For-Value; one seed alone is off (the residual is sketched), so the check is not vacuous."""
    mu, sub = fitted
    exact = pairwise_scores(vm, ROWS, TARGET)
    names = [str(j) for j in range(len(TARGET))]
    est = []
    for seed in range(60):
        r = centered_sketches(vm, ROWS + TARGET, mu, dim=16, seed=seed, subspace=sub)
        n = len(ROWS)
        targets = sketch_targets(r.sketch[n:], None, names, names, center_dot=r.center_dot[n:],
                                 center_sq_norm=r.center_sq_norm)
        est.append(score_sketches(r.sketch[:n], None, targets, center_dot=r.center_dot[:n]))
    est = np.stack(est)
    z = (est.mean(0) - exact) / (est.std(0, ddof=1) / np.sqrt(len(est)) + 1e-12 * np.abs(exact).max())
    assert np.all(np.abs(z) < 5), z
    assert np.median(np.abs(est[0] - exact) / np.abs(exact)) > 1e-3


def test_shape_is_parsed_and_refused_with_its_rule():
    assert parse_shape("32x16") == (32, 16) and parse_shape("8X4") == (8, 4)
    for bad in ("32", "0x4", "ax4"):
        with pytest.raises(ValueError, match="K1xK2"if bad != "0x4" else "positive"):
            parse_shape(bad)
