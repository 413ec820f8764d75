"""The in-memory Python API (notebooks, small data). The Ray job scales the same calls out."""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import numpy as np

from . import promptfit
from .center import (CENTER_NORMALIZE_ERROR, CenteredSketches, center_target_stats, center_terms,
                     centered_sketch_rows, check_center)
from .encode import Columns, Encoded, Encoder, RowError
from .engine import (DEFAULT_MAX_TOKENS, Reference, Scorer, TargetStats, build_reference, finish_target_stats,
                     fit_subspace_on_rows, target_form, target_partial)
from .model import ValuationModel
from .readout import DEFAULT_VOCAB_CHUNK
from .sketch import DEFAULT_SKETCH_DIM
from .subspace import Subspace, parse_shape


def encode_rows(vm: ValuationModel, rows: Iterable, *, max_length: int | None = None,
                overlong: str = "truncate", columns: Columns = Columns(), form: str = "auto",
                image_column: str = "images", response_eos: bool = True) -> list[Encoded]:
    """Encode rows (dicts, or already :class:`Encoded`); a bad row raises with its index and reason.
    ``max_length`` defaults to the model's context length; ``response_eos=False`` leaves the end-of-sequence
    token out of prompt/response rows."""
    kw = dict(max_length=max_length or vm.context_length, overlong=overlong, columns=columns,
              vocab_size=vm.head.vocab_size, form=form, response_eos=response_eos)
    if getattr(vm, "processor", None) is not None:
        from .vision import VisionEncoder

        enc = VisionEncoder(vm.processor, image_column=image_column, **kw)
    else:
        enc = Encoder(vm.tokenizer, **kw)
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, Encoded):
            out.append(row)
            continue
        try:
            out.append(enc(row, fallback_id=str(i)))
        except RowError as e:
            raise RowError(f"row {i} (id {enc.row_id(row, str(i))!r}): {e}") from None
    if not out:
        raise ValueError("no rows given")
    return out


def target_statistics(vm: ValuationModel, target_rows, *, groups: Sequence | None = None,
                      normalize: bool = False, center=None, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                      stats_form: str | None = None, **encode_kw) -> TargetStats:
    """Ḡ over the target rows (one per group when ``groups`` labels each target row).

    ``stats_form``: "dense" or "factored" (:func:`~forvalue_ray.engine.target_form`; the same scores); by default
    the cheaper one for this many target tokens, dense when centering.

    ``center``: rows of a random sample of the training corpus, or their statistics (``target_statistics``
    of them, or a saved ``OUT/center`` artifact): returns Ḡ_k − μ, μ the sample's mean gradient (see
    :func:`center_target_stats`).
    """
    if center is not None and normalize:
        raise ValueError(CENTER_NORMALIZE_ERROR)
    rows = encode_rows(vm, target_rows, **encode_kw)
    labels = ["all"] * len(rows) if groups is None else [str(g) for g in groups]
    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} group labels for {len(rows)} target rows")
    names = sorted(set(labels))
    index = [names.index(g) for g in labels]
    if stats_form is None:
        stats_form = "dense" if center is not None else target_form(sum(r.n_valued for r in rows), len(names),
                                                                    *vm.head.weight.shape)
    total, counts = target_partial(vm, rows, index, len(names), normalize=normalize, vocab_chunk=vocab_chunk,
                                   stats_form=stats_form)
    stats = finish_target_stats(total, counts, names, normalize, vm.provenance, dtype=vm.dtype)
    if center is None:
        return stats
    if not isinstance(center, TargetStats):
        center = target_statistics(vm, center, vocab_chunk=vocab_chunk, stats_form="dense", **encode_kw)
    return center_target_stats(stats, center)


def value_scores(vm: ValuationModel, train_rows, target_rows, *, normalize: bool = False, center=None,
                 vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **encode_kw) -> np.ndarray:
    """Mean over target rows of For-Value(train, target) (cosine For-Value if ``normalize``): [n_train].

    ``center``: a random sample of the training rows (or its statistics): the centered score, i.e. this
    value minus the value against the sample (:func:`center_target_stats`)."""
    stats = target_statistics(vm, target_rows, normalize=normalize, center=center, vocab_chunk=vocab_chunk,
                              **encode_kw)
    return score_against(vm, train_rows, stats, vocab_chunk=vocab_chunk, **encode_kw)[:, 0]


def group_scores(vm: ValuationModel, train_rows, target_rows, groups: Sequence, *, normalize: bool = False,
                 center=None, vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **encode_kw) -> tuple[list[str], np.ndarray]:
    """Mean For-Value against each group of target rows: (sorted group names, [n_train, K]); ``center`` as
    in :func:`value_scores`, for every group."""
    stats = target_statistics(vm, target_rows, groups=groups, normalize=normalize, center=center,
                              vocab_chunk=vocab_chunk, **encode_kw)
    return stats.names, score_against(vm, train_rows, stats, vocab_chunk=vocab_chunk, **encode_kw)


def score_against(vm: ValuationModel, train_rows, stats: TargetStats, *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                  max_tokens: int = DEFAULT_MAX_TOKENS, padding_side: str = "right", **encode_kw) -> np.ndarray:
    """Scores of training rows against precomputed target statistics: [n_train, K]."""
    rows = encode_rows(vm, train_rows, **encode_kw)
    return Scorer(vm, stats=stats, normalize=stats.normalize, vocab_chunk=vocab_chunk, max_tokens=max_tokens,
                  padding_side=padding_side)(rows)["scores"]


def pairwise_scores(vm: ValuationModel, train_rows, target_rows, *, normalize: bool = False, embed: bool = False,
                    vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **encode_kw):
    """For-Value of every (train, target) pair: [n_train, n_target]. ``embed``: also, from the same forward, the
    cosine of every pair's mean final hidden states (:func:`~forvalue_ray.engine.row_embeddings`): returns
    (values, embed)."""
    reference = build_reference(vm, encode_rows(vm, target_rows, **encode_kw), vocab_chunk=vocab_chunk)
    rows = encode_rows(vm, train_rows, **encode_kw)
    res = Scorer(vm, reference=reference, normalize=normalize, vocab_chunk=vocab_chunk)(rows)
    return (res["pairwise"], res["embed"]) if embed else res["pairwise"]


def prompt_fit(vm: ValuationModel, rows: Sequence[dict], keys: Sequence, *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
               **encode_kw) -> np.ndarray:
    """Prompt fit of prompt/response rows (:mod:`~forvalue_ray.promptfit`): the NLL per response token under the
    prompt of the next row with the same key (its task or template) minus the NLL under its own prompt: [n], NaN
    where a row has no partner (or the swapped row does not fit ``max_length`` whole). Low or negative: the response does not belong to its prompt (mislabeled)."""
    columns = encode_kw.get("columns", Columns())
    scorer = Scorer(vm, vocab_chunk=vocab_chunk)
    own = scorer(encode_rows(vm, rows, **encode_kw))["nll"]
    swapped = []
    for row in promptfit.swapped_rows(rows, keys, columns.prompt):
        try:
            swapped.append(promptfit.whole(encode_rows(vm, [row], **encode_kw)[0]) if row is not None else None)
        except RowError:
            swapped.append(None)
    have = [i for i, r in enumerate(swapped) if r is not None]
    other = np.full(len(own), np.nan)
    if have:
        other[have] = scorer([swapped[i] for i in have])["nll"]
    return promptfit.prompt_fit(own, other)


def target_reference(vm: ValuationModel, target_rows, *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                     **encode_kw) -> Reference:
    """The pairwise reference of a (small) target set: every valued token of each target row and its ‖G‖²
    (what :func:`pairwise_scores` scores against; :func:`token_contributions` takes it)."""
    return build_reference(vm, encode_rows(vm, target_rows, **encode_kw), vocab_chunk=vocab_chunk)


class TokenContributions(NamedTuple):
    """Each row's score split into one term per token: ``contributions[i][j]`` is token j's term of row i's
    score (0 where token j is not valued, e.g. the first token, prompt tokens, user turns), and
    ``contributions[i].sum(0) == scores[i]`` up to rounding in the model's dtype."""

    ids: list[str]
    input_ids: list[np.ndarray]  # [T_i] the row's tokens as encoded (after truncation)
    valued: list[np.ndarray]  # [T_i] bool: the token is valued (a label of the loss mask)
    contributions: list[np.ndarray]  # [T_i] float64 (one column chosen, or K == 1), else [T_i, K]
    scores: np.ndarray  # [n] (one column) or [n, K]: the rows' scores, as score_against / pairwise_scores give
    names: list[str]  # the columns: group names (mean: ["all"]), or target ids (pairwise)


def token_contributions(vm: ValuationModel, rows, stats: TargetStats | Reference, *, target=None,
                        normalize: bool | None = None, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                        max_tokens: int = DEFAULT_MAX_TOKENS, **encode_kw) -> TokenContributions:
    """Why a row scores what it does: its score as a sum over its valued tokens t.

    Against target statistics Ḡ (``stats``: :func:`target_statistics`, a loaded ``OUT/target``, or centered,
    Ḡ − μ) a row's score is s(z) = ⟨Σ_t α_t h_tᵀ, Ḡ⟩ = Σ_t α_tᵀ Ḡ h_t, so token t's term is c_t = α_tᵀ Ḡ h_t —
    the per-token values the readout sums anyway (the same vocabulary-chunked pass in token blocks: bounded
    memory whatever the row length). Cosine statistics (built with ``normalize=True``): each term divided by the
    row's ‖G(z)‖ as the score is (the target norms are inside Ḡ). Centered statistics: c_t = α_tᵀ (Ḡ − μ) h_t.
    Groups: one column per group. ``stats`` may also be a pairwise reference (:func:`target_reference`): one
    column per target row z', c_t = Σ_{s∈z'} (α_t·α'_s)(h_t·h'_s), divided by ‖G(z)‖ ‖G(z')‖ when ``normalize``.

    ``target``: a column's name (group name, target id) or index: that column only ([T] per row); default every
    column ([T, K], or [T] when there is one). ``normalize`` defaults to the statistics' own setting (False for a
    reference). Rows are dicts (or :class:`Encoded`), encoded as for the scores (``encode_kw``)."""
    encoded = encode_rows(vm, rows, **encode_kw)
    if isinstance(stats, Reference):
        names = list(stats.ids)
        scorer = Scorer(vm, reference=stats, normalize=bool(normalize), vocab_chunk=vocab_chunk, max_tokens=max_tokens)
        key = "pairwise"
    else:
        if normalize is not None and normalize != stats.normalize:
            raise ValueError(f"the target statistics were built with normalize={stats.normalize}")
        names = list(stats.names)
        scorer = Scorer(vm, stats=stats, normalize=stats.normalize, vocab_chunk=vocab_chunk, max_tokens=max_tokens)
        key = "scores"
    res = scorer.token_terms(encoded)
    terms, scores = res["token_" + key], res[key]
    if target is not None:
        col = target if isinstance(target, (int, np.integer)) else _column(names, target)
        terms, scores, names = [t[:, col] for t in terms], scores[:, col], [names[col]]
    elif len(names) == 1:
        terms, scores = [t[:, 0] for t in terms], scores[:, 0]
    valued = [np.r_[False, np.asarray(r.labels[1:]) != -100] for r in encoded]
    return TokenContributions([r.id for r in encoded], [np.asarray(r.input_ids) for r in encoded], valued, terms,
                              scores, names)


def _column(names: list[str], target) -> int:
    if str(target) not in names:
        shown = ", ".join(map(repr, names[:10])) + (" …" if len(names) > 10 else "")
        raise ValueError(f"no target {target!r}: the columns are {shown}")
    return names.index(str(target))


def sketches(vm: ValuationModel, rows, *, dim: int = DEFAULT_SKETCH_DIM, seed: int = 0,
             vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **encode_kw) -> np.ndarray:
    """Per-row TensorSketches [n, dim]: ⟨sketch(z), sketch(z')⟩ estimates For-Value(z, z') without bias."""
    scorer = Scorer(vm, sketch_dim=dim, sketch_seed=seed, vocab_chunk=vocab_chunk)
    return scorer(encode_rows(vm, rows, **encode_kw))["sketch"]


def centered_sketches(vm: ValuationModel, rows, center, *, dim: int = DEFAULT_SKETCH_DIM, seed: int = 0,
                      subspace: Subspace | None = None, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                      **encode_kw) -> CenteredSketches:
    """Sketches centered on μ, the mean gradient of ``center`` (a random sample of the corpus, or its dense
    statistics: ``target_statistics(..., stats_form="dense")`` or a loaded ``OUT/center``). Index and targets must be
    centered on the same μ; score them with :func:`~forvalue_ray.sketch.sketch_targets` and
    :func:`~forvalue_ray.sketch.score_sketches` (each takes ``center_dot``), which estimate For-Value without bias
    and with less variance than raw sketches when rows resemble the corpus mean. Costs one more dense LM-head product
    per token (⟨G, μ⟩) than :func:`sketches`.

    ``subspace`` (:func:`fit_subspace` on the same μ): each row is [A X Bᵀ, TS(X − Π_A X Π_B)] for X = G − μ, k1·k2 +
    ``dim`` numbers; the same estimators apply, still unbiased, with the fitted subspace's share of the energy
    exact instead of sketched."""
    center = _dense_center(vm, center, vocab_chunk, encode_kw)
    scorer = Scorer(vm, stats=center, sketch_dim=dim, sketch_seed=seed, subspace=subspace, vocab_chunk=vocab_chunk)
    scored = scorer(encode_rows(vm, rows, **encode_kw))
    return centered_sketch_rows(scored, center_terms(center.stats[0], scorer.hashes, subspace))


def fit_subspace(vm: ValuationModel, sample, center=None, *, shape: str | tuple[int, int] = "32x16",
                 vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **encode_kw) -> Subspace:
    """The subspace of a sketch index (``sketch --subspace K1xK2``), fitted on ``sample``, a random sample of the
    corpus: k1 vocabulary × k2 hidden directions that hold most of the centered gradients' energy. ``center``: the
    sample's statistics if already built (default: computed from ``sample``). Fitted on the sample's first
    FIT_COLUMNS // k2 rows."""
    k1, k2 = parse_shape(shape) if isinstance(shape, str) else shape
    center = _dense_center(vm, sample if center is None else center, vocab_chunk, encode_kw)
    return fit_subspace_on_rows(vm, encode_rows(vm, sample, **encode_kw), center.stats[0], k1, k2, vocab_chunk)


def _dense_center(vm: ValuationModel, center, vocab_chunk: int, encode_kw: dict) -> TargetStats:
    if not isinstance(center, TargetStats):
        center = target_statistics(vm, center, vocab_chunk=vocab_chunk, stats_form="dense", **encode_kw)
    check_center(center)
    return center


def diagnostics(vm: ValuationModel, rows, **encode_kw) -> dict[str, np.ndarray]:
    """Per-row number of valued tokens and mean negative log-likelihood."""
    return Scorer(vm)(encode_rows(vm, rows, **encode_kw))
