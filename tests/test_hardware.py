"""`--dtype auto` and the default torch threads: decided from what the machine reports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from shared.config import DecoderConfig, EncoderConfig, load
from shared.hardware import (CpuFeatures, Runtime, cgroup_cpu_quota, cpu_features, resolve_dtype,
                             set_torch_threads, usable_cpus)

AMX = CpuFeatures("Intel(R) Xeon(R) Platinum 8480+", amx_bf16=True, avx512_bf16=True, avx512=True, avx2=True)
AVX512_BF16 = CpuFeatures("AMD EPYC 9654", amx_bf16=False, avx512_bf16=True, avx512=True, avx2=True)
AVX2 = CpuFeatures("AMD EPYC 7B13", amx_bf16=False, avx512_bf16=False, avx512=False, avx2=True)


def test_auto_is_the_default_of_both_model_services():
    assert load(EncoderConfig, environ={}).dtype == load(DecoderConfig, environ={}).dtype == "auto"


@pytest.mark.parametrize("cpu", [AMX, AVX512_BF16])
def test_auto_serves_bfloat16_on_cpus_with_native_bf16(cpu):
    choice = resolve_dtype("auto", "cpu", cpu=cpu)
    assert choice.name == "bfloat16"
    assert cpu.model in choice.reason and cpu.isa in choice.reason


def test_auto_serves_float32_where_bf16_is_emulated():
    choice = resolve_dtype("auto", "cpu", cpu=AVX2)
    assert choice.name == "float32"
    assert "AVX2" in choice.reason and "no native bfloat16" in choice.reason


@pytest.mark.parametrize(("supported", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_on_cuda_follows_the_devices_bf16_support(supported, expected):
    assert resolve_dtype("auto", "cuda:0", cuda_bf16=supported).name == expected


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept_whatever_the_cpu(name):
    for cpu in (AMX, AVX2):
        assert resolve_dtype(name, "cpu", cpu=cpu).name == name
        assert resolve_dtype(name, "cpu", cpu=cpu).reason == "set explicitly"


def test_an_unknown_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        resolve_dtype("int4", "cpu", cpu=AMX)


def test_this_machines_answer_matches_its_cpu_flags():
    """The detection agrees with what the kernel says of this CPU (/proc/cpuinfo flags)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    cpu = cpu_features()
    assert cpu.amx_bf16 == ("amx_bf16" in flags)
    assert cpu.avx512_bf16 == ("avx512_bf16" in flags)
    assert cpu.avx2 == ("avx2" in flags)
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert resolve_dtype("auto", "cpu").name == ("bfloat16" if native else "float32")


def write_cgroup(root: Path, v2: str | None = None, v1: tuple[int, int] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (root / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return root


def test_cgroup_quota_is_read_from_v2_and_v1(tmp_path):
    assert cgroup_cpu_quota(write_cgroup(tmp_path / "a", v2="150000 100000")) == 1.5
    assert cgroup_cpu_quota(write_cgroup(tmp_path / "b", v2="max 100000")) is None
    assert cgroup_cpu_quota(write_cgroup(tmp_path / "c", v1=(200000, 100000))) == 2.0
    assert cgroup_cpu_quota(write_cgroup(tmp_path / "d", v1=(-1, 100000))) is None
    assert cgroup_cpu_quota(tmp_path / "none") is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "none") == affinity
    assert usable_cpus(write_cgroup(tmp_path / "half", v2="50000 100000")) == 1
    assert usable_cpus(write_cgroup(tmp_path / "many", v2=f"{100000 * (affinity + 8)} 100000")) == affinity
    if affinity >= 2:
        assert usable_cpus(write_cgroup(tmp_path / "one-and-a-half", v2="150000 100000")) == 2


def test_default_threads_are_the_usable_cpus_and_an_explicit_number_wins():
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(0) == usable_cpus() == torch.get_num_threads()
        assert set_torch_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_runtime_reports_the_choice_and_the_device():
    runtime = Runtime.of(resolve_dtype("auto", "cpu", cpu=AVX2), 3, "cpu", "int8", 1234, backend="torch")
    fields = runtime.info_fields()
    assert (fields["dtype"], fields["torch_threads"], fields["quantize"], fields["weight_bytes"]) == (
        "float32", 3, "int8", 1234)
    assert fields["device_name"] == cpu_features().describe()
    assert runtime.log_fields()["dtype_reason"] == fields["dtype_reason"]
