"""What ``--dtype auto`` means on the device a model runs on: precision is a hardware decision.

- a CPU with native bf16 (x86 AVX512-BF16 or AMX-BF16, Arm's BF16 extension)
  runs torch's oneDNN bf16 kernels faster than fp32 (about 2x with AVX512-BF16
  alone, below): bfloat16;
- a CUDA GPU: float16 (tensor cores; finer mantissa than bf16), then bfloat16
  where the GPU has it (wider range, for models that overflow in float16);
- anything else: float32 (bf16 or fp16 emulated on a CPU is slower than fp32:
  bf16 matmuls ran 160x slower than fp32 on an AVX2-only EPYC).

AVX512-BF16 without AMX was measured on its own (AMD EPYC Zen 4, family 25 model
17, torch 2.13, one thread, fp32 time / bf16 time in one process, 20 tokens):
DistilBERT-base forward 2.1x at batch 16 and 1.6-2.0x at batch 1; GPT-2 prefill
2.0x; a GPT-2 decode step 2.1x at batch 16 but 0.8x at batch 1, so one 16-token
greedy answer alone took 0.93x and sixteen together 1.8x. It pays everywhere but
for one sequence decoding alone, so it is kept (README, "Where a repository is
served").

The CPU's features are read from what the kernel reports, never guessed from
the vendor. A reduced precision is taken only if the repository builder's
parity gate passed it for this model (tritonhf/precision.py writes the passing
ones into the config parameter ``verified_dtypes``); otherwise float32.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 flags, then Arm's Features entry
FLOAT32 = "float32"
T = TypeVar("T")
REDUCED = ("float16", "bfloat16")


def cpuinfo_field(keys: tuple[str, ...], cpuinfo: Path) -> str | None:
    """The first CPU's value of the first of ``keys`` that /proc/cpuinfo has; None where the kernel doesn't say."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


@cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where the kernel doesn't say."""
    return frozenset((cpuinfo_field(("flags", "Features"), cpuinfo) or "").split())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name (x86 ``model name``; Arm kernels name only the implementer and part), for the record."""
    return cpuinfo_field(("model name", "Hardware", "CPU part"), cpuinfo) or platform.machine() or "unknown"


def cpu_bf16(flags: Collection[str] | None = None) -> str | None:
    """The CPU feature that gives native bf16 compute, or None."""
    found = cpu_flags() if flags is None else flags
    return next((flag for flag in CPU_BF16_FLAGS if flag in found), None)


# ONNX Runtime's int8 quantisation presets (optimum's AutoQuantizationConfig methods), best first, each with the
# CPU flags it is made for (any one of them). int8_target picks the first one the CPU has; tritonhf/placement.py
# records the same flags as what a repository's int8 export needs where it is served.
INT8_PRESETS = {
    "avx512_vnni": ("avx512_vnni", "amx_int8"),  # u8 x s8 dot products natively (VNNI, or AMX's tiles)
    "arm64": ("asimddp",),  # Arm's dot-product instructions
    "avx2": ("avx2",),  # u8 x u8: no saturation on plain AVX2, and the fallback on any x86-64
}


def int8_target(flags: Collection[str] | None = None) -> str:
    """ONNX Runtime's quantisation preset for this CPU (optimum's AutoQuantizationConfig method).

    VNNI (AVX512-VNNI, or AMX) multiplies u8 activations by s8 weights natively;
    without it, the avx2 preset's u8 weights avoid the u8 x s8 saturation of plain
    AVX2, but run slower than float32 on a VNNI CPU (measured: 0.8x float32, where
    the VNNI preset gives 2.7x).
    """
    found = set(cpu_flags() if flags is None else flags)
    return next((preset for preset, needs in INT8_PRESETS.items() if found & set(needs)), "avx2")


MAX_CPU_INSTANCES = 8  # beyond, each instance's batches get small and memory grows with every copy


CGROUP = Path("/sys/fs/cgroup")
CPU_LIMIT_FILES = (  # cgroup v2, then v1's cpu controller as systemd and Docker mount it
    ("cpu.max",),  # "<quota> <period>", or "max <period>"
    ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"),  # quota -1: none
    ("cpu,cpuacct/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_period_us"),
)


def cpu_quota(root: Path = CGROUP) -> int | None:
    """The cgroup's CPU limit in whole CPUs, rounded up (Kubernetes' ``limits.cpu``, ``docker --cpus``), if any.

    Read from cgroup v2, else v1: nodes on older distributions still run v1, where a v2-only reader saw no limit
    and sized a 2-CPU pod by its 64-core node."""
    for files in CPU_LIMIT_FILES:
        try:
            quota, period = map(int, " ".join((root / f).read_text() for f in files).replace("max", "-1").split()[:2])
        except (OSError, ValueError):
            continue
        return max(1, -(-quota // period)) if quota > 0 and period > 0 else None
    return None


MEMORY_LIMIT_FILES = ("memory.max", "memory/memory.limit_in_bytes")  # cgroup v2 ("max": none), then v1


def memory_limit(root: Path = CGROUP) -> int:
    """The bytes this process's cgroup may hold (Kubernetes' ``limits.memory``), or the host's memory if less."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name in MEMORY_LIMIT_FILES:
        try:
            return min(total, int((root / name).read_text()))
        except (OSError, ValueError):  # absent, or "max"
            continue
    return total


def cpu_count() -> int:
    """The CPUs this process may use: its cpuset, capped by its cgroup's CPU limit (a pod limited to 2 CPUs on a
    64-core node gets 2)."""
    return min(len(os.sched_getaffinity(0)), cpu_quota() or os.cpu_count() or 1)


def default_instances(device: str) -> int:
    """Model instances per model: on a CPU one single-threaded instance per core (up to MAX_CPU_INSTANCES).

    Measured on 2 cores (README, "Perf"): two instances of one thread
    served DistilBERT at 1.9x the throughput of one instance of two threads at
    concurrency 16 (1.6x-2.2x across variants), because one instance's Python
    work (tokenising, Triton's tensors in and out) overlaps the other's forward
    instead of leaving both cores idle. On a GPU: one instance, batching instead.
    """
    return 1 if device == "gpu" else max(1, min(MAX_CPU_INSTANCES, cpu_count()))


def on_a_thread_that_ends(work: Callable[[], T]) -> T:
    """``work()``, run on a thread that ends with it: where a model is loaded.

    OpenMP (torch's CPU threads) gives every thread that runs a parallel region
    a team of workers, kept until that thread ends. With two teams in a process,
    GNU OpenMP counts more threads than CPUs and stops spinning at its barriers:
    every parallel region then pays a sleep and a wake. A stream's scheduler
    computes on a thread of its own, so a load that ran on the thread that
    built it left a second team behind. Measured on a 2-core Xeon, bfloat16:
    an elementwise multiply took 83 us instead of 12, a packed gpt2 step (24
    rows, two prompt chunks) 74 ms instead of 47, and the stream served 327
    tokens/s in-process instead of 463.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="tritonhf-load") as loader:
        return loader.submit(work).result()


def instance_count(model_config: Mapping) -> int:
    """A model config's instances, over its instance groups (none: one group of one, as Triton gives)."""
    return sum(int(group.get("count", 1)) for group in model_config.get("instance_group") or [{}])


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


TENSORRT = "tensorrt"
ONNX_PROVIDERS = ("cuda", TENSORRT)  # config parameter onnx_provider, on a GPU (tritonhf tune tries both)


def execution_providers(device: str, provider: str = "cuda") -> list[str | tuple[str, dict[str, object]]]:
    """ONNX Runtime's providers, first choice first: on a GPU its CUDA kernels, or TensorRT's engines in fp16
    (built on the GPU for the shapes it meets, kept in an engine cache for the next load), with CUDA for what
    TensorRT won't take; the CPU for the rest, and for everything on a CPU instance."""
    if provider not in ONNX_PROVIDERS:
        raise ValueError(f"onnx_provider {provider!r}: one of {', '.join(ONNX_PROVIDERS)}")
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])})
    tensorrt = (
        "TensorrtExecutionProvider",
        {
            "device_id": int(device.split(":")[1]),
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(Path(tempfile.gettempdir()) / "tritonhf-tensorrt"),
        },
    )
    return [*([tensorrt] if provider == TENSORRT else []), cuda, "CPUExecutionProvider"]
