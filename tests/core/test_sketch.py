"""TensorSketch: ⟨sketch(z), sketch(z')⟩ estimates For-Value(z, z') without bias over the
random hashes, raw and centered on a mean gradient; sketches are deterministic per seed and depend on the row
only; every stored form (int8 rounding) and every scoring path keeps the estimate unbiased."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from forvalue_ray import (centered_sketches, encode_rows, pairwise_scores, sketches, target_statistics,
                          value_scores)
from forvalue_ray.engine import Scorer
from forvalue_ray import sketch as sketch_module
from forvalue_ray.sketch import (SketchHashes, compress_sketches, restore_sketches, score_sketches, sketch_of_matrix,
                                 sketch_targets)
from forvalue_ray.testing.tiny import VOCAB, tiny_model

# tiny models: one thread is fastest, and far faster when the 2 cores are shared (spinning OpenMP threads)

TRAIN = [{"text": "the cat sat on the mat"}, {"prompt": "Q: 2+2?", "response": " A: 4"},
         {"text": "zebra!"}, {"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello there"}]}]
TARGET = [{"text": "a cat on a mat"}, {"prompt": "Q: 3+3?", "response": " A: 6"}, {"text": "zebras and cats"}]

CORR_TRAIN = [{"text": t} for t in [
    "the cat sat on the mat", "a dog ran in the park", "cats and dogs are pets", "2 + 2 = 4 and 3 + 3 = 6",
    "12 * 12 = 144", "the sun is hot today", "rain falls on the green hills", "def f(x): return x + 1",
    "print('hello, world')", "zebras run fast!", "THE QUICK BROWN FOX", "numbers: 1, 2, 3, 4, 5"]]
CORR_TARGET = [{"text": t} for t in [
    "a cat on a mat", "7 + 5 = 12", "the dog in the park", "return x * 2", "HELLO THERE", "sunny hills"]]


@pytest.fixture(scope="module")
def vm():
    return tiny_model("llama")  # float64


@pytest.fixture(scope="module")
def encoded(vm):
    return encode_rows(vm, TRAIN), encode_rows(vm, TARGET)


def sketch_rows(vm, rows, dim, seed):
    return Scorer(vm, sketch_dim=dim, sketch_seed=seed)(rows)["sketch"].astype(np.float64)


def test_unbiased_over_seeds(vm, encoded):
    """The mean over 200 seeds of ⟨sketch(z), sketch(z')⟩ converges to the exact pairwise score."""
    train, target = encoded
    exact = pairwise_scores(vm, TRAIN, TARGET)
    exact_mean = value_scores(vm, TRAIN, TARGET)
    n_seeds, dim = 200, 64
    est, est_mean = [], []
    for seed in range(n_seeds):
        sk = sketch_rows(vm, train + target, dim, seed)
        s_train, s_target = sk[: len(train)], sk[len(train):]
        est.append(s_train @ s_target.T)
        est_mean.append(s_train @ s_target.mean(0))  # sketches are linear in G: the mean target sketch
    est, est_mean = np.stack(est), np.stack(est_mean)

    for e, x, what in ((est, exact, "pairwise"), (est_mean, exact_mean, "mean")):
        mean, se = e.mean(0), e.std(0, ddof=1) / np.sqrt(n_seeds)
        z = (mean - x) / se
        assert np.all(np.abs(z) < 5), f"{what}: z-scores {z}"
        assert np.sqrt(np.mean(z ** 2)) < 2.0, f"{what}: z-scores {z}"

        def rel(n):
            return np.linalg.norm(e[:n].mean(0) - x) / np.linalg.norm(x)

        # the error of the mean shrinks like 1/sqrt(n): the mean of all 200 seeds vs the means of 10 disjoint
        # blocks of 20 seeds, expected ratio 1/sqrt(10) = 0.32. Errors in units of each pair's own spread
        # (the largest pair would dominate otherwise) and RMS over blocks, so one lucky block does not decide.
        sd = e.std(0, ddof=1)
        blocks = e.reshape(10, n_seeds // 10, *e.shape[1:]).mean(1)
        err_20 = np.sqrt(np.mean((blocks - x) ** 2 / sd ** 2))
        err_all = np.sqrt(np.mean((mean - x) ** 2 / sd ** 2))
        print(f"\n{what}: error of the mean / spread of one estimate: 20 seeds {err_20:.4f}, {n_seeds} seeds "
              f"{err_all:.4f}; relative error at {n_seeds} seeds {rel(n_seeds):.4f}; max |z| {np.abs(z).max():.2f}",
              end="")
        assert err_all < 0.6 * err_20, (what, err_20, err_all)
        assert rel(n_seeds) < 0.15, (what, rel(n_seeds))
        # one sketch is a noisy estimate at dim 64: the test would be vacuous if it were exact (the median seed,
        # not one seed that may happen to land close)
        single = np.median([np.linalg.norm(e[i] - x) / np.linalg.norm(x) for i in range(n_seeds)])
        assert single > 3 * rel(n_seeds), (what, single, rel(n_seeds))


def test_same_seed_identical_different_seed_different(vm, encoded):
    rows = encoded[0]
    a = sketch_rows(vm, rows, 128, seed=5)
    b = sketch_rows(vm, rows, 128, seed=5)
    c = sketch_rows(vm, rows, 128, seed=6)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (len(rows), 128)
    assert np.all(np.abs(a - c).max(1) > 1e-3 * np.abs(a).max(1))  # every row differs
    np.testing.assert_array_equal(sketches(vm, TRAIN, dim=128, seed=5), a)
    assert sketches(vm, TRAIN, dim=128).dtype == np.float32


def test_hashes_deterministic_and_valid():
    a, b = SketchHashes.make(64, 3, VOCAB, 32), SketchHashes.make(64, 3, VOCAB, 32)
    c = SketchHashes.make(64, 4, VOCAB, 32)
    for name in ("vocab_buckets", "vocab_signs", "hidden_buckets", "hidden_signs"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.vocab_buckets, c.vocab_buckets)
    assert a.vocab_buckets.shape == (VOCAB,) and a.hidden_buckets.shape == (32,)
    assert int(a.vocab_buckets.min()) >= 0 and int(a.vocab_buckets.max()) < 64
    assert set(a.vocab_signs.tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="at least 2"):
        SketchHashes.make(1, 0, VOCAB, 32)


def test_two_row_batch_equals_rows_one_at_a_time(vm, encoded):
    train, _ = encoded
    for pair in ([0, 1], [2, 3], [3, 0]):
        both = sketch_rows(vm, [train[i] for i in pair], 256, 1)
        for k, i in enumerate(pair):
            one = sketch_rows(vm, [train[i]], 256, 1)[0]
            np.testing.assert_allclose(both[k], one, rtol=1e-6, atol=1e-6 * np.abs(one).max())


def test_odd_dim(vm, encoded):
    """An odd sketch size (rfft/irfft round trip with n=dim) is unbiased too: a quick check on the mean."""
    train, target = encoded
    exact = pairwise_scores(vm, TRAIN[:1], TARGET[:1])[0, 0]
    est = [(lambda s: s[0] @ s[1])(sketch_rows(vm, [train[0], target[0]], 33, seed)) for seed in range(60)]
    se = np.std(est, ddof=1) / np.sqrt(len(est))
    assert abs(np.mean(est) - exact) < 5 * se


def test_correlation_with_exact_grows_with_dim(vm):
    """Sketch inner products vs exact pairwise scores at dims 1024 / 4096 / 16384 (printed; run pytest -s)."""
    train, target = encode_rows(vm, CORR_TRAIN), encode_rows(vm, CORR_TARGET)
    exact = pairwise_scores(vm, train, target)
    seeds = (0, 1, 2)
    corr = {}
    for dim in (1024, 4096, 16384):
        pear, spear, per_target = [], [], []
        for seed in seeds:
            sk = sketch_rows(vm, train + target, dim, seed)
            est = sk[: len(train)] @ sk[len(train):].T
            pear.append(sps.pearsonr(est.ravel(), exact.ravel())[0])
            spear.append(sps.spearmanr(est.ravel(), exact.ravel())[0])
            per_target.append(np.mean([sps.spearmanr(est[:, j], exact[:, j])[0] for j in range(len(target))]))
        corr[dim] = (np.mean(pear), np.mean(spear), np.mean(per_target))
        print(f"\nsketch dim {dim:6d}: Pearson {corr[dim][0]:.4f}  Spearman {corr[dim][1]:.4f}  "
              f"per-target Spearman {corr[dim][2]:.4f}  (all {len(train)}x{len(target)} pairs, "
              f"mean of seeds {seeds})", end="")
    print()
    for k in range(3):
        assert corr[16384][k] >= corr[1024][k] - 0.02, corr
        assert corr[16384][k] > 0.9, corr


# ---- storage ------------------------------------------------------------------------------------------------

def test_int8_storage_is_unbiased_over_rounding_seeds():
    """Stochastic rounding: the mean over seeds of a restored int8 row, and of the inner product of two restored
    rows, converge to the float values (within 5 standard errors); each row stays within one step of its float."""
    rng = np.random.default_rng(0)
    sk = (rng.standard_t(3, size=(2, 256)) * [[1.0], [30.0]]).astype(np.float32)  # heavy tails, unequal scales
    exact = float(sk[0].astype(np.float64) @ sk[1])
    rows, products = [], []
    for seed in range(400):
        q, scale = compress_sketches(sk, "int8", ["a", "b"], seed)
        x = restore_sketches(q, scale)
        assert np.all(np.abs(x - sk) <= scale[:, None] * (1 + 1e-6))
        rows.append(x)
        products.append(x[0] @ x[1])
    rows, products = np.array(rows), np.array(products)
    frac = (sk / scale[:, None]) % 1  # a coordinate rounds up with this probability: its standard error follows
    se = scale[:, None] * np.sqrt(frac * (1 - frac) / len(rows))
    assert np.all(np.abs(rows.mean(0) - sk) <= 5 * se + 1e-6 * np.abs(sk))
    assert abs(products.mean() - exact) <= 5 * products.std() / np.sqrt(len(products))
    assert products.std() > 0  # the rounding is random (a deterministic one could not be unbiased)


def test_storage_round_trips_and_is_reproducible():
    rng = np.random.default_rng(1)
    sk = rng.normal(size=(3, 64)).astype(np.float32)
    q32, s32 = compress_sketches(sk, "float32", ["a", "b", "c"], 0)
    assert s32 is None and np.array_equal(restore_sketches(q32, s32), sk)
    q16, _ = compress_sketches(sk, "float16", ["a", "b", "c"], 0)
    assert q16.dtype == np.float16 and np.allclose(restore_sketches(q16, None), sk, rtol=2 ** -10, atol=0)
    a, b = (compress_sketches(sk, "int8", ["a", "b", "c"], 7) for _ in range(2))
    assert np.array_equal(a[0], b[0]) and a[0].dtype == np.int8  # the same bytes on a re-run
    c, _ = compress_sketches(sk[[1]], "int8", ["b"], 7)
    assert np.array_equal(c[0], a[0][1])  # a row's rounding depends on its id, not on its batch mates
    with pytest.raises(ValueError, match="--storage must be one of"):
        compress_sketches(sk, "int4", ["a", "b", "c"], 0)


def test_binary_storage_is_exact_along_the_row_and_unbiased_across_it():
    """binary: x̂ = Rᵀ(s·sign(R x)) with R orthogonal and ⟨x̂, x⟩ = ‖x‖² exactly; for y = αx + symmetric noise the
    mean error of ⟨x̂, y⟩ over many rows is within 5 standard errors of 0, on dense and on very sparse rows; the
    error's spread is about √(π/2 − 1)·‖x‖‖y⊥‖/√dim."""
    from forvalue_ray.sketch import rotate

    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 48))
    np.testing.assert_allclose(rotate(rotate(x), inverse=True), x, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(rotate(x), axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    dim, n = 256, 2000
    for nonzero in (3, dim):
        x = np.zeros((n, dim))
        for row in x:
            row[rng.choice(dim, nonzero, replace=False)] = rng.standard_t(3, nonzero)
        q, scale = compress_sketches(x, "binary", [str(i) for i in range(n)], 0)
        assert q.dtype == np.uint8 and q.shape == (n, dim // 8) and scale.shape == (n, 2)
        np.testing.assert_allclose(scale[:, 1], np.linalg.norm(x, axis=1), rtol=1e-6)
        xhat = restore_sketches(q, scale)
        np.testing.assert_allclose(np.einsum("nd,nd->n", xhat, x), (x * x).sum(1), rtol=1e-5)
        noise = rng.normal(size=(n, dim)) * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(dim)
        y = 0.3 * x + noise
        err = (np.einsum("nd,nd->n", xhat, y) - np.einsum("nd,nd->n", x, y)) / (
            np.linalg.norm(x, axis=1) * np.linalg.norm(noise, axis=1))
        assert abs(err.mean()) <= 5 * err.std() / np.sqrt(n), (nonzero, err.mean(), err.std())
        assert 0.5 < err.std() / np.sqrt((np.pi / 2 - 1) / dim) < 1.5, (nonzero, err.std())
    with pytest.raises(ValueError, match="multiple of 8"):
        compress_sketches(np.ones((2, 12)), "binary", ["a", "b"], 0)


def test_binary_storage_is_unbiased_for_rows_that_share_a_few_dominant_coordinates():
    """A sketch of G where a hidden state has a massive activation carries a few huge coordinates, shared by the
    rows of a class. Rows x = spike + noise against a target y = spike + noise: the mean relative error of the binary
    estimate of ⟨x, y⟩, over 200 draws of the spike's place and of y, is within 5 standard errors of 0 (about 0.004).
    One Hartley round (the rotation before two) leaves +3.45% here: each spike becomes a ±c pattern, not Gaussian."""
    rng = np.random.default_rng(11)
    dim, n, trials = 1024, 50, 200
    bias = []
    for _ in range(trials):
        spike = np.zeros(dim)
        spike[rng.choice(dim, 2, replace=False)] = np.sqrt(dim / 2)  # as much energy as the noise
        x, y = spike + rng.normal(size=(n, dim)), spike + rng.normal(size=(1, dim))
        exact = (x @ y.T)[:, 0]
        q, scale = compress_sketches(x, "binary", [str(i) for i in range(n)], 0)
        estimate = score_sketches(q, scale, sketch_targets(y, None, ["y"], ["y"]))[:, 0]
        bias.append((estimate - exact).mean() / exact.mean())
    assert abs(np.mean(bias)) <= 5 * np.std(bias) / np.sqrt(trials), (np.mean(bias), np.std(bias))


def test_binary_index_scores_in_its_rotated_basis_as_the_restored_rows_do(monkeypatch):
    """The scan keeps binary rows in the rotated basis and rotates the target columns instead: the same numbers as
    the restored rows' inner products with the (any storage) target rows; the cosine divides by the stored ‖x‖."""
    monkeypatch.setattr(sketch_module, "SCORE_BLOCK_ROWS", 3)
    rng = np.random.default_rng(6)
    x_float, t_float = rng.normal(size=(10, 64)), rng.normal(size=(6, 64))
    q, scale = compress_sketches(x_float, "binary", [str(i) for i in range(10)], 0)
    labels = ["b", "a", "b", "b", "a", "c"]
    x = restore_sketches(q, scale)
    for storage in ("float32", "int8", "binary"):
        tq, tscale = compress_sketches(t_float, storage, [str(i) for i in range(6)], 0)
        t = restore_sketches(tq, tscale)
        t_norm = np.linalg.norm(t_float, axis=1) if storage == "binary" else np.linalg.norm(t, axis=1)
        means = np.stack([t[[i for i, g in enumerate(labels) if g == k]].mean(0) for k in "abc"], axis=1)
        close = lambda got, want: np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())  # float32 sums
        close(score_sketches(q, scale, sketch_targets(tq, tscale, labels, "abc")), x @ means)
        unit = t / t_norm[:, None]
        cos_means = np.stack([unit[[i for i, g in enumerate(labels) if g == k]].mean(0) for k in "abc"], axis=1)
        cos = (x / np.linalg.norm(x_float, axis=1, keepdims=True)) @ cos_means
        close(score_sketches(q, scale, sketch_targets(tq, tscale, labels, "abc", normalize=True)), cos)


def test_score_sketches_in_blocks_equals_one_product(monkeypatch):
    monkeypatch.setattr(sketch_module, "SCORE_BLOCK_ROWS", 3)
    rng = np.random.default_rng(2)
    q, scale = compress_sketches(rng.normal(size=(10, 32)), "int8", [str(i) for i in range(10)], 0)
    tq, tscale = compress_sketches(rng.normal(size=(6, 32)), "int8", [str(i) for i in range(6)], 0)
    labels = ["b", "a", "b", "b", "a", "c"]
    x, t = restore_sketches(q, scale), restore_sketches(tq, tscale)
    means = np.stack([t[[i for i, g in enumerate(labels) if g == k]].mean(0) for k in "abc"], axis=1)
    np.testing.assert_allclose(score_sketches(q, scale, sketch_targets(tq, tscale, labels, "abc")), x @ means,
                               rtol=1e-5)
    unit = t / np.linalg.norm(t, axis=1, keepdims=True)
    cos_means = np.stack([unit[[i for i, g in enumerate(labels) if g == k]].mean(0) for k in "abc"], axis=1)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ cos_means
    np.testing.assert_allclose(score_sketches(q, scale, sketch_targets(tq, tscale, labels, "abc", normalize=True)),
                               cos, rtol=1e-5)
    with pytest.raises(ValueError, match="not among the columns"):
        sketch_targets(tq, tscale, labels, "ab")


# ---- centering ----------------------------------------------------------------------------------------------

def test_sketch_of_a_mean_gradient_is_the_mean_of_the_row_sketches(vm, encoded):
    """TS is linear: TS(μ) computed from the dense mean gradient (a second code path: columns shifted, no FFT)
    equals the mean of the rows' own sketches, and one row's dense gradient sketches to that row's sketch."""
    train, _ = encoded
    for dim, seed in ((64, 0), (257, 3)):
        hashes = SketchHashes.make(dim, seed, VOCAB, vm.head.weight.shape[1])
        rows = sketch_rows(vm, train, dim, seed)
        mu = target_statistics(vm, train, stats_form="dense").stats[0]
        np.testing.assert_allclose(sketch_of_matrix(mu, hashes, vocab_block=7).numpy(), rows.mean(0),
                                   rtol=1e-5, atol=1e-6 * np.abs(rows).max())
        one = target_statistics(vm, train[1:2], stats_form="dense").stats[0]
        np.testing.assert_allclose(sketch_of_matrix(one, hashes).numpy(), rows[1], rtol=1e-5,
                                   atol=1e-6 * np.abs(rows).max())


def test_centered_estimator_is_unbiased_with_less_variance():
    """Synthetic gradients near their mean μ (as rows of one corpus are): over 400 hash seeds the centered estimate
    ⟨c, c'⟩ + a + a' − ‖μ‖², through sketch_targets/score_sketches and int8 storage, averages to the exact ⟨G, G'⟩
    (mean over groups and pairs alike), and its spread is a fraction of the raw sketch's."""
    rng = np.random.default_rng(3)
    V, d, dim, n_seeds = 40, 6, 32, 400
    mu = torch.tensor(rng.normal(size=(V, d)))
    train = [mu + 0.3 * torch.tensor(rng.normal(size=(V, d))) for _ in range(3)]
    target = [mu + 0.3 * torch.tensor(rng.normal(size=(V, d))) for _ in range(4)]
    labels, names = ["x", "y", "x", "y"], ["x", "y"]
    flat = lambda ms: torch.stack(ms).reshape(len(ms), -1).numpy()  # noqa: E731
    exact_pairs = flat(train) @ flat(target).T
    exact = np.stack([exact_pairs[:, [0, 2]].mean(1), exact_pairs[:, [1, 3]].mean(1)], axis=1)
    a_train, a_target = flat(train) @ mu.reshape(-1).numpy(), flat(target) @ mu.reshape(-1).numpy()
    m = float(mu.pow(2).sum())
    centered, raw = [], []
    for seed in range(n_seeds):
        h = SketchHashes.make(dim, seed, V, d)
        ts = lambda ms: np.stack([sketch_of_matrix(g, h).numpy() for g in ms])  # noqa: E731
        ts_mu, s_train, s_target = sketch_of_matrix(mu, h).numpy(), ts(train), ts(target)
        raw.append(score_sketches(s_train, None, sketch_targets(s_target, None, labels, names)))
        ids = [f"{seed}/{i}" for i in range(7)]
        q, scale = compress_sketches(s_target - ts_mu, "int8", ids[3:], seed)
        targets = sketch_targets(q, scale, labels, names, center_dot=a_target, center_sq_norm=m)
        q, scale = compress_sketches(s_train - ts_mu, "int8", ids[:3], seed)
        centered.append(score_sketches(q, scale, targets, center_dot=a_train))
    for est in (np.array(centered), np.array(raw)):
        z = (est.mean(0) - exact) / (est.std(0, ddof=1) / np.sqrt(n_seeds))
        assert np.all(np.abs(z) < 5), z
    ratio = np.array(centered).std(0) / np.array(raw).std(0)
    assert np.all(ratio < 0.5), ratio  # ‖G − μ‖ ≈ 0.3‖μ‖ here: about 0.3 expected


def test_centered_sketches_of_the_model_are_unbiased(vm, encoded):
    """The in-memory API: ⟨G, μ⟩ equals the mean-mode value against the centering sample, and over 100 seeds the
    centered estimate of every (train, target) pair averages to the exact pairwise For-Value."""
    train, target = encoded
    exact = pairwise_scores(vm, TRAIN, TARGET)
    sample = TRAIN[:3] + TARGET[:1]
    first = centered_sketches(vm, train + target, sample, dim=64, seed=0)
    np.testing.assert_allclose(first.center_dot[:len(train)], value_scores(vm, TRAIN, sample), rtol=1e-6)
    mu = target_statistics(vm, sample, stats_form="dense")
    assert first.center_sq_norm == pytest.approx(float(mu.stats[0].double().pow(2).sum()), rel=1e-9)
    runs = [first] + [centered_sketches(vm, train + target, mu, dim=64, seed=seed) for seed in range(1, 100)]
    n = len(train)
    est = np.stack([score_sketches(r.sketch[:n], None, sketch_targets(
        r.sketch[n:], None, [str(j) for j in range(len(target))], [str(j) for j in range(len(target))],
        center_dot=r.center_dot[n:], center_sq_norm=r.center_sq_norm), center_dot=r.center_dot[:n]) for r in runs])
    z = (est.mean(0) - exact) / (est.std(0, ddof=1) / np.sqrt(len(runs)))
    assert np.all(np.abs(z) < 5), z
    assert np.median(np.abs(est[0] - exact) / np.abs(exact)) > 0.01  # one seed is a noisy estimate: not vacuous
