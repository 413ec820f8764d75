"""--dtype auto: which dtype a model runs in when none is given, and why (recorded in the provenance)."""

from __future__ import annotations

import json

import pytest
import torch

from forvalue_ray import model as fvmodel
from forvalue_ray.model import choose_dtype, cpu_bf16_flags, load_model, stored_dtype
from forvalue_ray.testing.tiny import tiny_model


def _saved(tmp_path, dtype: torch.dtype):
    vm = tiny_model("llama", dtype=dtype)
    vm.model.save_pretrained(tmp_path)
    vm.tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU that reports AMX and multiplies bf16 4x faster than fp32 (whatever this machine is)."""
    monkeypatch.setattr(fvmodel, "cpu_bf16_flags", lambda: ("amx_bf16",))
    monkeypatch.setattr(fvmodel, "bf16_matmul_speedup", lambda: 4.0)


def test_cpuinfo_flags_are_read_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: x\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16\n")
    assert cpu_bf16_flags(str(info)) == ("amx_bf16",)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512_bf16 amx_bf16\n")
    assert cpu_bf16_flags(str(info)) == ("amx_bf16", "avx512_bf16")
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_bf16_flags(str(info)) == ()
    assert cpu_bf16_flags(str(tmp_path / "absent")) == ()


def test_sixteen_bit_weights_run_in_bf16_where_the_cpu_multiplies_it(tmp_path, native_bf16):
    path = _saved(tmp_path, torch.bfloat16)
    assert stored_dtype(path) == "bfloat16"
    dtype, why = choose_dtype("cpu", path)
    assert dtype == "bfloat16-autocast" and "amx_bf16" in why and "4.0x" in why
    vm = load_model(str(path), device="cpu")
    assert vm.autocast == torch.bfloat16 and next(vm.model.parameters()).dtype == torch.float32  # fp32 weights
    assert vm.provenance["dtype"] == "bfloat16-autocast" and "natively" in vm.provenance["dtype_reason"]


def test_full_precision_weights_keep_float32(tmp_path, native_bf16):
    path = _saved(tmp_path, torch.float32)
    dtype, why = choose_dtype("cpu", path)
    assert dtype == "float32" and "float32" in why
    vm = load_model(str(path), device="cpu")
    assert vm.dtype == torch.float32 and vm.autocast is None


def test_flags_alone_do_not_choose_bf16(tmp_path, monkeypatch):
    path = _saved(tmp_path, torch.bfloat16)
    monkeypatch.setattr(fvmodel, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    monkeypatch.setattr(fvmodel, "bf16_matmul_speedup", lambda: 1.1)  # flags, but emulated: no faster
    dtype, why = choose_dtype("cpu", path)
    assert dtype == "float32" and "1.1x" in why


def test_a_cpu_without_native_bf16_stays_float32(tmp_path, monkeypatch):
    path = _saved(tmp_path, torch.bfloat16)
    monkeypatch.setattr(fvmodel, "cpu_bf16_flags", lambda: ())
    assert choose_dtype("cpu", path) == ("float32", "this CPU has no native bf16 (AMX or AVX512-BF16)")


def test_this_machine_agrees_with_its_flags_and_timing(tmp_path):
    """The real detection on whatever CPU runs the suite: bf16 only with both the flags and the speed."""
    path = _saved(tmp_path, torch.bfloat16)
    dtype, why = choose_dtype("cpu", path)
    native = bool(cpu_bf16_flags()) and fvmodel.bf16_matmul_speedup() >= fvmodel.BF16_MIN_SPEEDUP
    assert (dtype == "bfloat16-autocast") == native, why


def test_explicit_dtype_and_gpu_and_gguf(tmp_path, native_bf16):
    path = _saved(tmp_path, torch.float32)
    vm = load_model(str(path), dtype="bfloat16", device="cpu")
    assert vm.dtype == torch.bfloat16 and "dtype_reason" not in vm.provenance
    assert choose_dtype("cuda", path) == ("bfloat16", "GPU")
    (tmp_path / "forvalue_source.json").write_text(json.dumps({"gguf": "m.Q4_1.gguf"}))  # a converted GGUF
    assert stored_dtype(tmp_path) == "gguf" and choose_dtype("cpu", tmp_path)[0] == "bfloat16-autocast"


def test_the_job_chooses_once_and_every_replica_loads_the_choice(tmp_path, native_bf16):
    from forvalue_ray.job import ValueConfig, spec

    path = _saved(tmp_path / "model", torch.bfloat16)
    cfg = ValueConfig(model=str(path), train="train.jsonl", target="target.jsonl", out=str(tmp_path / "out"))
    assert cfg.dtype == "auto"
    _, provenance, fp = spec.model_identity(cfg)
    assert provenance["dtype"] == "bfloat16-autocast" and "natively" in provenance["dtype_reason"]
    assert spec.model_load_kw(cfg, provenance)["dtype"] == "bfloat16-autocast"
    # the choice is part of the model's identity: a float32 run of the same weights is another job
    cfg.dtype = "float32"
    _, provenance32, fp32 = spec.model_identity(cfg)
    assert provenance32["dtype"] == "float32" and "dtype_reason" not in provenance32 and fp32 != fp
    cfg.dtype = "fp16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        spec.model_identity(cfg)


def test_autocast_runs_every_matmul_in_bf16_over_a_float32_residual_stream():
    """bfloat16-autocast is the float32 model under torch.autocast(bfloat16) (a second path: the same weights run
    by hand under autocast), its hidden states rounded to bf16 once, at the end, and read out as a bf16 model's
    are; its scores differ from float32 by bf16 rounding (how much less than bfloat16 weights' on real data is
    benchmarked: benchmarks/bench_dtype.py)."""
    from forvalue_ray import encode_rows, target_statistics
    from forvalue_ray.engine import Scorer
    from forvalue_ray.model import ValuationModel

    base = tiny_model("llama", dtype=torch.float32)
    ac = ValuationModel(base.model, base.tokenizer, {"source": "in-memory"}, autocast=torch.bfloat16)
    assert ac.dtype == torch.bfloat16 and next(ac.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(ac.head.weight, base.head.weight.to(torch.bfloat16), rtol=0, atol=0)
    ids = torch.randint(3, base.head.vocab_size, (3, 24))
    mask = torch.ones_like(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        by_hand = base.hidden_states(ids, mask).to(torch.bfloat16)
    h = ac.hidden_states(ids, mask)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h, by_hand, rtol=0, atol=0)
    h32 = base.hidden_states(ids, mask)
    rel = float((h.float() - h32).norm() / h32.norm())
    assert 1e-4 < rel < 3e-2, rel  # bf16 rounding of the matmul inputs (2^-8), never none, never more

    rows = [{"prompt": f"q{i} " * (3 + i), "response": f"a{i} " * (2 + i % 3)} for i in range(6)]
    targets = [{"prompt": "t " * 4, "response": "u " * 3}]
    scores = {}
    for name, vm in (("float32", base), ("autocast", ac)):
        stats = target_statistics(vm, encode_rows(vm, targets), stats_form="dense")
        scores[name] = Scorer(vm, stats=stats)(encode_rows(vm, rows))["scores"][:, 0]
    err = float(abs(scores["autocast"] - scores["float32"]).max() / abs(scores["float32"]).max())
    assert 0 < err < 3e-2, err


def test_autocast_is_its_own_model_identity(tmp_path):
    path = _saved(tmp_path, torch.bfloat16)
    f32 = load_model(str(path), dtype="float32", device="cpu")
    ac = load_model(str(path), dtype="bfloat16-autocast", device="cpu")
    assert ac.provenance["dtype"] == "bfloat16-autocast" and ac.fingerprint() != f32.fingerprint()
    with pytest.raises(ValueError, match="dtype must be one of .*bfloat16-autocast"):
        load_model(str(path), dtype="bf16", device="cpu")
