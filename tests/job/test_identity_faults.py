"""Fault and bad-input handling that needs no Ray: content identity of model directories, a target row whose
statistics overflow (the Python API), JSON arrays, damaged files, `score`'s refusal messages, `submit` retries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import forvalue_ray as fv
from forvalue_ray.encode import RowError
from forvalue_ray.model import _dir_digest
from forvalue_ray.testing.tiny import tiny_model

POISON = "~"  # a character whose input embedding is +inf: every row holding it overflows


def poisoned(vm):
    """The model with the POISON character's input embedding set to +inf (its rows' statistics are NaN)."""
    tok_id = vm.tokenizer.convert_tokens_to_ids(POISON)
    with torch.no_grad():
        vm.model.get_input_embeddings().weight[tok_id] = float("inf")
    return vm


def test_dir_digest_reads_every_byte_of_large_weights(tmp_path, monkeypatch):
    """Weights edited in place, anywhere in a large file, change the model directory's digest; the full hash is
    cached by path, size and mtime, so an unchanged directory is not hashed again."""
    monkeypatch.setenv("FORVALUE_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    weights = d / "model.safetensors"
    data = bytearray(np.random.default_rng(0).bytes(5 << 20))  # 5 MB: above the whole-file threshold
    weights.write_bytes(bytes(data))
    before = _dir_digest(d)
    assert _dir_digest(d) == before
    cache = json.loads((tmp_path / "cache" / "file_digests.json").read_text())
    assert str(weights.resolve()) in cache
    data[(5 << 20) // 2 + 12345] ^= 0xFF  # one byte between the blocks a sampled digest reads
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == 5 << 20
    assert _dir_digest(d) != before


def test_hub_id_resolves_to_its_snapshot_or_not_found(tmp_path, monkeypatch):
    """A hub id is pinned to its cached snapshot's commit (a new snapshot is another model); a misspelt path is
    'not found', not transformers' repo-id message."""
    from forvalue_ray.model import resolve_model

    hub = tmp_path / "hub" / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        snap = hub / "snapshots" / commit
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    path_a, prov_a = resolve_model("org/tiny")
    assert path_a.endswith("a" * 40) and prov_a["weights_digest"] == "hub:" + "a" * 40
    (hub / "refs" / "main").write_text("b" * 40)  # a newer snapshot cached
    path_b, prov_b = resolve_model("org/tiny")
    assert path_b.endswith("b" * 40) and prov_b["weights_digest"] != prov_a["weights_digest"]
    for typo in ("runs/modle", str(tmp_path / "no-such-model"), "./model"):
        with pytest.raises(FileNotFoundError, match=f"not found: {typo}"):
            resolve_model(typo)


def test_api_raises_naming_a_target_row_that_overflows():
    """One target row whose statistics overflow: the API raises naming it (index and id), never a silent NaN;
    without it the scores are finite."""
    vm = poisoned(tiny_model("llama"))
    train = [{"text": "the cat sat"}, {"text": "a dog ran"}]
    target = [{"id": "ok", "text": "cats sit"}, {"id": "bad", "text": f"x {POISON} y"}]
    with pytest.raises(RowError, match=r"target row 1 \(id 'bad'\): non-finite"):
        fv.value_scores(vm, train, target)
    with pytest.raises(RowError, match=r"target row 1 \(id 'bad'\)"):
        fv.pairwise_scores(vm, train, target)
    assert np.isfinite(fv.value_scores(vm, train, target[:1])).all()


def test_submit_retries_transient_errors_with_backoff(capsys):
    """HTTP 500 'No available agent' and connection errors from a just-started head are retried, with bounded
    backoff and a log line each; a client error is not."""
    from forvalue_ray.submit import with_retries

    calls, slept = [], []
    errors = [RuntimeError("Request failed with status code 500: No available agent to submit job, please try "
                           "again later."), ConnectionError("refused"), RuntimeError("status code 503: busy")]

    def flaky():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "raysubmit_1"

    assert with_retries(flaky, "submitting the job", sleep=slept.append) == "raysubmit_1"
    assert len(calls) == 4 and slept == [1.0, 2.0, 4.0]
    assert capsys.readouterr().err.count("submit: submitting the job failed") == 3
    with pytest.raises(RuntimeError, match="status code 400"):
        with_retries(lambda: (_ for _ in ()).throw(RuntimeError("status code 400: bad entrypoint")), "x",
                     sleep=slept.append)
    with pytest.raises(ConnectionError):  # bounded: gives up once the wait is spent
        with_retries(lambda: (_ for _ in ()).throw(ConnectionError("down")), "x", wait_s=2.5, sleep=lambda s: None)
