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
    assert dtype == torch.bfloat16 and "amx_bf16" in why and "4.0x" in why
    vm = load_model(str(path), device="cpu")
    assert vm.dtype == torch.bfloat16
    assert vm.provenance["dtype"] == "bfloat16" and "natively" in vm.provenance["dtype_reason"]


def test_full_precision_weights_keep_float32(tmp_path, native_bf16):
    path = _saved(tmp_path, torch.float32)
    dtype, why = choose_dtype("cpu", path)
    assert dtype == torch.float32 and "float32" in why
    assert load_model(str(path), device="cpu").dtype == torch.float32


def test_flags_alone_do_not_choose_bf16(tmp_path, monkeypatch):
    path = _saved(tmp_path, torch.bfloat16)
    monkeypatch.setattr(fvmodel, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    monkeypatch.setattr(fvmodel, "bf16_matmul_speedup", lambda: 1.1)  # flags, but emulated: no faster
    dtype, why = choose_dtype("cpu", path)
    assert dtype == torch.float32 and "1.1x" in why


def test_a_cpu_without_native_bf16_stays_float32(tmp_path, monkeypatch):
    path = _saved(tmp_path, torch.bfloat16)
    monkeypatch.setattr(fvmodel, "cpu_bf16_flags", lambda: ())
    assert choose_dtype("cpu", path) == (torch.float32, "this CPU has no native bf16 (AMX or AVX512-BF16)")


def test_this_machine_agrees_with_its_flags_and_timing(tmp_path):
    """The real detection on whatever CPU runs the suite: bf16 only with both the flags and the speed."""
    path = _saved(tmp_path, torch.bfloat16)
    dtype, why = choose_dtype("cpu", path)
    native = bool(cpu_bf16_flags()) and fvmodel.bf16_matmul_speedup() >= fvmodel.BF16_MIN_SPEEDUP
    assert (dtype == torch.bfloat16) == native, why


def test_explicit_dtype_and_gpu_and_gguf(tmp_path, native_bf16):
    path = _saved(tmp_path, torch.float32)
    vm = load_model(str(path), dtype="bfloat16", device="cpu")
    assert vm.dtype == torch.bfloat16 and "dtype_reason" not in vm.provenance
    assert choose_dtype("cuda", path) == (torch.bfloat16, "GPU")
    (tmp_path / "forvalue_source.json").write_text(json.dumps({"gguf": "m.Q4_1.gguf"}))  # a converted GGUF
    assert stored_dtype(tmp_path) == "gguf" and choose_dtype("cpu", tmp_path)[0] == torch.bfloat16


def test_the_job_chooses_once_and_every_replica_loads_the_choice(tmp_path, native_bf16):
    from forvalue_ray.job import ValueConfig, spec

    path = _saved(tmp_path / "model", torch.bfloat16)
    cfg = ValueConfig(model=str(path), train="train.jsonl", target="target.jsonl", out=str(tmp_path / "out"))
    assert cfg.dtype == "auto"
    _, provenance, fp = spec.model_identity(cfg)
    assert provenance["dtype"] == "bfloat16" and "natively" in provenance["dtype_reason"]
    assert spec.model_load_kw(cfg, provenance)["dtype"] == "bfloat16"
    # the choice is part of the model's identity: a float32 run of the same weights is another job
    cfg.dtype = "float32"
    _, provenance32, fp32 = spec.model_identity(cfg)
    assert provenance32["dtype"] == "float32" and "dtype_reason" not in provenance32 and fp32 != fp
    cfg.dtype = "fp16"
    with pytest.raises(ValueError, match="--dtype must be one of"):
        spec.model_identity(cfg)
