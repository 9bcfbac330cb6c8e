"""What this machine can do, asked at run time: native bf16, the CPUs this process may use.

`--dtype auto` (the default) serves bfloat16 where the hardware multiplies it natively and float32
elsewhere. On CPUs the line is AMX or AVX-512 BF16: there bf16 GEMMs run 2-4x faster than float32
(Sapphire Rapids, AMX: ~1.8 TFLOP/s vs ~0.5); without them oneDNN emulates bf16 with float32 FMAs
plus conversions, slower than float32 itself (an AVX2-only EPYC: bf16 several times slower). On
CUDA it is `torch.cuda.is_bf16_supported()` (Ampere and later).

`usable_cpus` is what torch's intra-op threads should default to: the CPUs of this process's
affinity mask, capped by a cgroup CPU quota (a container limited to 2 CPUs on a 64-core node must
not start 64 threads). Nothing here imports torch at module level: the gateway imports none.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU as torch's cpuinfo (the library oneDNN's dispatch also reads) reports it."""

    model: str  # e.g. "Intel(R) Xeon(R) Platinum 8480+"
    amx_bf16: bool
    avx512_bf16: bool
    avx512: bool
    avx2: bool

    @property
    def native_bf16(self) -> bool:
        return self.amx_bf16 or self.avx512_bf16

    @property
    def isa(self) -> str:
        """The best matmul ISA, for logs and benchmark tables: "AMX", "AVX-512 BF16", "AVX-512", "AVX2"."""
        names = (("AMX", self.amx_bf16), ("AVX-512 BF16", self.avx512_bf16), ("AVX-512", self.avx512),
                 ("AVX2", self.avx2))
        return next((name for name, has in names if has), "baseline x86-64 / other")

    def describe(self) -> str:
        return f"{self.model} ({self.isa})"


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # "float32", "bfloat16" or "float16"
    reason: str  # why, in words (logged at start, shown in GetModelInfo and `vlsplit health --verbose`)


def cpu_features() -> CpuFeatures:
    import torch

    cpu = torch.cpu
    return CpuFeatures(model=cpu_model(), amx_bf16=cpu._is_amx_tile_supported(),
                       avx512_bf16=cpu._is_avx512_bf16_supported(), avx512=cpu._is_avx512_supported(),
                       avx2=cpu._is_avx2_supported())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def check_dtype(requested: str) -> None:
    if requested not in DTYPE_NAMES:
        raise ValueError(f"dtype {requested!r} is not one of {', '.join(DTYPE_NAMES)}")


def resolve_dtype(requested: str, device: str, cpu: CpuFeatures | None = None,
                  cuda_bf16: bool | None = None) -> DtypeChoice:
    """The serving dtype for `requested` ("auto" or a dtype name) on `device`. `cpu` / `cuda_bf16`
    default to asking this machine; tests pass both answers."""
    check_dtype(requested)
    if requested != "auto":
        return DtypeChoice(requested, "set explicitly")
    if device.startswith("cuda"):
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = torch.cuda.is_bf16_supported()
        return (DtypeChoice("bfloat16", "auto: this CUDA device supports bfloat16") if cuda_bf16 else
                DtypeChoice("float32", "auto: this CUDA device has no bfloat16 support"))
    cpu = cpu or cpu_features()
    if cpu.native_bf16:
        return DtypeChoice("bfloat16", f"auto: {cpu.describe()} multiplies bfloat16 natively")
    return DtypeChoice("float32", f"auto: {cpu.describe()} has no native bfloat16 (AMX or AVX-512 BF16), "
                                  "where bfloat16 is emulated and slower than float32")


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 / v1 CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU limit in CPUs (cpu.max "200000 100000" -> 2.0), or None when unlimited/unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def set_torch_threads(requested: int) -> int:
    """Set torch's intra-op threads: `requested`, or (0) every usable CPU. Returns the number set."""
    import torch

    threads = requested or usable_cpus()
    torch.set_num_threads(threads)
    return threads


def device_name(device: str) -> str:
    """The CPU's model and ISA, or the CUDA device's name."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_features().describe()


@dataclass(frozen=True)
class Runtime:
    """How a server runs its model: logged at start and reported by GetModelInfo."""

    dtype: DtypeChoice
    threads: int
    device_name: str
    quantize: str
    weight_bytes: int
    backend: str = ""

    @classmethod
    def of(cls, dtype: DtypeChoice, threads: int, device: str, quantize: str, weight_bytes: int,
           backend: str = "") -> "Runtime":
        return cls(dtype, threads, device_name(device), quantize, weight_bytes, backend)

    def info_fields(self) -> dict:
        """The ModelInfo fields (common.proto) this fills."""
        return {"dtype": self.dtype.name, "dtype_reason": self.dtype.reason, "torch_threads": self.threads,
                "device_name": self.device_name, "quantize": self.quantize, "weight_bytes": self.weight_bytes,
                "backend": self.backend}

    def log_fields(self) -> dict:
        """The same, for the start-up log: weights in MiB, no empty backend."""
        from .allocator import applied

        fields = {k: v for k, v in self.info_fields().items() if k != "weight_bytes" and v != ""}
        return {**fields, "weight_mib": round(self.weight_bytes / (1 << 20), 1), "allocator": applied()}
