"""What ``--dtype auto`` means on the device a model runs on: precision is a hardware decision.

- a CPU with native bf16 (x86 AVX512-BF16 or AMX-BF16, Arm's BF16 extension)
  runs torch's oneDNN bf16 kernels at several times its fp32 speed: bfloat16;
- a CUDA GPU: float16 (tensor cores; finer mantissa than bf16), then bfloat16
  where the GPU has it (wider range, for models that overflow in float16);
- anything else: float32 (bf16 or fp16 emulated on a CPU is slower than fp32).

The CPU's features are read from what the kernel reports, never guessed from
the vendor. A reduced precision is taken only if the repository builder's
parity gate passed it for this model (tritonhf/precision.py writes the passing
ones into the config parameter ``verified_dtypes``); otherwise float32.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 flags, then Arm's Features entry
FLOAT32 = "float32"
REDUCED = ("float16", "bfloat16")


@cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where the kernel doesn't say."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_bf16(flags: Collection[str] | None = None) -> str | None:
    """The CPU feature that gives native bf16 compute, or None."""
    found = cpu_flags() if flags is None else flags
    return next((flag for flag in CPU_BF16_FLAGS if flag in found), None)


def int8_target(flags: Collection[str] | None = None) -> str:
    """ONNX Runtime's quantisation preset for this CPU (optimum's AutoQuantizationConfig method).

    VNNI (AVX512-VNNI, or AMX) multiplies u8 activations by s8 weights natively;
    without it, the avx2 preset's u8 weights avoid the u8 x s8 saturation of plain
    AVX2, but run slower than float32 on a VNNI CPU (measured: 0.8x float32, where
    the VNNI preset gives 2.7x).
    """
    found = cpu_flags() if flags is None else flags
    if {"avx512_vnni", "amx_int8"} & set(found):
        return "avx512_vnni"
    if "asimddp" in found:  # Arm's dot-product instructions
        return "arm64"
    return "avx2"


MAX_CPU_INSTANCES = 8  # beyond, each instance's batches get small and memory grows with every copy


def cpu_quota(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The cgroup v2 CPU limit in whole CPUs, rounded up (Kubernetes' ``limits.cpu``, ``docker --cpus``), if any."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, -(-int(quota) // int(period)))


def cpu_count() -> int:
    """The CPUs this process may use: its cpuset, capped by its cgroup's CPU limit (a pod limited to 2 CPUs on a
    64-core node gets 2)."""
    return min(len(os.sched_getaffinity(0)), cpu_quota() or os.cpu_count() or 1)


def default_instances(device: str) -> int:
    """Model instances per model: on a CPU one single-threaded instance per core (up to MAX_CPU_INSTANCES).

    Measured on 2 cores (README, "Performance"): two instances of one thread
    served DistilBERT at 1.9x the throughput of one instance of two threads at
    concurrency 16 (1.6x-2.2x across variants), because one instance's Python
    work (tokenising, Triton's tensors in and out) overlaps the other's forward
    instead of leaving both cores idle. On a GPU: one instance, batching instead.
    """
    return 1 if device == "gpu" else max(1, min(MAX_CPU_INSTANCES, cpu_count()))


def cpu_threads(requested: str, instances: int) -> int:
    """Compute threads per model instance: ``auto`` shares this process's CPUs among the model's instances.

    Each instance is a process with its own thread pools; two instances of two
    threads each on two cores would fight over them (OpenMP threads spin at
    every barrier, and a descheduled one stalls the others).
    """
    if requested != "auto":
        return max(1, int(requested))
    return max(1, cpu_count() // max(1, instances))


@dataclass(frozen=True)
class Choice:
    dtype: str
    reason: str

    def __str__(self) -> str:
        return f"{self.dtype} ({self.reason})"


def candidates(device: str, flags: Collection[str] | None = None) -> list[Choice]:
    """The reduced precisions ``auto`` would take on ``device`` ("cpu", "cuda", "cuda:N"), best first."""
    if device.startswith("cuda"):
        import torch

        bf16 = [Choice("bfloat16", "CUDA, float16 not verified")] if torch.cuda.is_bf16_supported() else []
        return [Choice("float16", "CUDA"), *bf16]
    flag = cpu_bf16(flags)
    return [Choice("bfloat16", f"the CPU has {flag}")] if flag else []


def choose(requested: str, device: str, verified: Collection[str], flags: Collection[str] | None = None) -> Choice:
    """The dtype a model loads in: ``requested``, or what ``auto`` picks, if the parity gate passed it."""
    if requested != "auto":
        if requested == FLOAT32 or requested in verified:
            return Choice(requested, "requested")
        return Choice(FLOAT32, f"{requested} requested but it did not pass the parity gate")
    options = candidates(device, flags)
    for option in options:
        if option.dtype in verified:
            return option
    if options:
        tried = ", ".join(option.dtype for option in options)
        return Choice(FLOAT32, f"{tried} did not pass the parity gate")
    return Choice(FLOAT32, "no native reduced precision on this device")
