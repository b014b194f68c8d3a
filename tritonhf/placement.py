"""Whether the CPU choices a repository's build made hold on the host that serves it.

``tritonhf build`` takes three decisions from the build machine's CPU, and the
repository is then served anywhere (pushed to object storage, baked into an
image, scheduled on whatever node has room):

- the int8 export's ONNX Runtime preset (hardware.int8_target). The avx512_vnni
  preset's u8 x s8 products saturate on an x86 CPU without VNNI, where ONNX
  Runtime falls back to AVX2's VPMADDUBSW (its quantisation docs say so), and the
  build's parity gate no longer vouches for the answers: ``serve`` refuses it.
  The other presets run anywhere, only slower: a warning.
- a network fixed in bfloat16 at build time (TorchScript traced in it; an eager
  model given ``--dtype bfloat16``): on a CPU without native bf16 it is emulated,
  160x slower than float32 in one measured matmul on an AVX2-only EPYC: a warning.
  (``--dtype auto`` eager models choose where they load, and need no record.)
- the instance count, one per CPU the build host counted: a warning where this
  host would count other (the thread counts follow the serving host's CPUs).

The builder writes them to HOST_FILE in the repository (:func:`record`); ``tritonhf
serve`` checks them against this host (:func:`check_host`); ``tritonhf deploy``
schedules on them (:func:`node_affinity`, Node Feature Discovery's labels).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tritonhf import TritonHFError, storage
from tritonhf.backends.python_hf.hardware import (
    CPU_BF16_FLAGS,
    INT8_PRESETS,
    MAX_CPU_INSTANCES,
    cpu_count,
    cpu_flags,
    cpu_model,
    int8_target,
)
from tritonhf.repository import manifest_if_any

logger = logging.getLogger(__name__)

HOST_FILE = ".tritonhf.host.json"
REFUSE, WARN = "refuse", "warn"
INT8, PRECISION, INSTANCES = "int8 preset", "precision", "instances"
EVERY_MODEL = "*"
# Presets whose answers are wrong, not just slow, on a CPU without the flags they were made for.
SATURATING_PRESETS = {"avx512_vnni"}
# The build host's flags worth recording: every flag a choice may need, and the ones that would change a choice.
RECORDED_FLAGS = sorted({*CPU_BF16_FLAGS, *itertools.chain(*INT8_PRESETS.values()), "avx512f", "amx_tile"})
# Node Feature Discovery labels a node with feature.node.kubernetes.io/cpu-cpuid.<FLAG>=true, FLAG being the
# kernel's flag as klauspost/cpuid names it: upper case without underscores (avx512_vnni -> AVX512VNNI).
NFD_PREFIX = "feature.node.kubernetes.io/cpu-cpuid."
PREFERRED_WEIGHT = 50  # of 100: a node without the flag still serves, only slower


@dataclass(frozen=True)
class Need:
    """One choice of the build and what it needs of the serving host's CPU."""

    model: str  # served name, or EVERY_MODEL
    kind: str  # INT8, PRECISION, INSTANCES
    value: str  # the preset, the dtype, the instance count
    needs: tuple[str, ...] = ()  # /proc/cpuinfo flags, any one of which will do
    severity: str = WARN
    cpus: int | None = None  # INSTANCES: the CPUs the count was sized for

    @property
    def choice(self) -> str:
        what = {INT8: "int8 preset {}", PRECISION: "compiled in {}", INSTANCES: "{} instances per model"}
        return what[self.kind].format(self.value)


@dataclass(frozen=True)
class HostRecord:
    """The build host, and what each of the build's CPU choices needs."""

    cpu: str
    flags: tuple[str, ...]  # the build host's RECORDED_FLAGS
    cpus: int
    choices: tuple[Need, ...]

    def to_json(self) -> str:
        body = asdict(self)
        body["choices"] = [{"choice": need.choice, **asdict(need)} for need in self.choices]
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> HostRecord:
        body = json.loads(text)
        choices = [{k: tuple(v) if k == "needs" else v for k, v in c.items() if k != "choice"} for c in body["choices"]]
        return cls(body["cpu"], tuple(body["flags"]), body["cpus"], tuple(Need(**choice) for choice in choices))


def record(manifest: Mapping[str, Mapping[str, str]], dtype: str, device: str, instances: int | None) -> HostRecord:
    """What the build of ``manifest`` (repository.Manifest) decided from this host's CPU.

    ``dtype``: the build's --dtype; ``instances``: the count when hardware.default_instances chose it, else None.
    """
    preset = int8_target()
    choices = []
    for name, entry in manifest.items():
        if entry["dtype"] == "int8":
            severity = REFUSE if preset in SATURATING_PRESETS else WARN
            choices.append(Need(name, INT8, preset, INT8_PRESETS[preset], severity))
        fixed = "runtime" in entry or dtype != "auto"  # an export's file, or a precision asked for by name
        if device == "cpu" and fixed and entry["dtype"] == "bfloat16":
            choices.append(Need(name, PRECISION, "bfloat16", CPU_BF16_FLAGS))
    if instances is not None and device == "cpu":
        choices.append(Need(EVERY_MODEL, INSTANCES, str(instances), cpus=cpu_count()))
    flags = cpu_flags()
    return HostRecord(cpu_model(), tuple(f for f in RECORDED_FLAGS if f in flags), cpu_count(), tuple(choices))


def write(repository: Path, host: HostRecord) -> None:
    (repository / HOST_FILE).write_text(host.to_json())


def read(files: storage.Files) -> HostRecord | None:
    """A tritonhf repository's record, local or on S3; None for a build older than it."""
    try:
        return HostRecord.from_json(files.read(HOST_FILE))
    except (FileNotFoundError, TritonHFError):  # S3 says NoSuchKey as a TritonHFError
        return None


def models(needs: Collection[Need]) -> str:
    return ", ".join(sorted({need.model for need in needs}))


def problems(host: HostRecord, flags: Collection[str], cpus: int) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for serving ``host``'s build on a CPU with ``flags`` and ``cpus``; one line per choice."""
    refusals, warnings = [], []
    here = f"this host's CPU ({cpu_model()}, {cpus} CPUs)"
    built = f"the build host ({host.cpu}, {host.cpus} CPUs)"
    groups = itertools.groupby(sorted(host.choices, key=lambda n: (n.kind, n.value)), key=lambda n: (n.kind, n.value))
    for (kind, value), grouped in groups:
        group = list(grouped)
        need = group[0]
        if need.needs and not set(need.needs) & set(flags):
            wanted = " or ".join(need.needs)
            if kind == INT8:
                line = (
                    f"{models(group)}: the int8 export was quantised with ONNX Runtime's {value} preset, made for a CPU"
                    f" with {wanted}; {here} has none"
                )
                if need.severity == REFUSE:
                    refusals.append(
                        f"{line}, and there its u8 x s8 products saturate, so the parity gate's answers no longer hold."
                        " Rebuild the repository on this CPU (tritonhf build takes the preset from the build host),"
                        f" or serve it on a CPU with {wanted}"
                    )
                else:
                    warnings.append(f"{line}: it runs, slower than it was measured; rebuild on this CPU")
            else:
                warnings.append(
                    f"{models(group)}: {need.choice} on {built}; {here} has no native bf16 ({wanted}), so it runs"
                    " emulated, slower than float32: rebuild on this CPU, or serve on one with native bf16"
                )
        elif kind == INT8 and int8_target(flags) != value:
            warnings.append(
                f"{models(group)}: int8 preset {value} from {built}; this host would take {int8_target(flags)}"
                " (faster here): rebuild on this CPU"
            )
        elif kind == INSTANCES and min(MAX_CPU_INSTANCES, cpus) != int(value):
            warnings.append(
                f"{value} instances per model, one per CPU of {built}; {here} would run"
                f" {min(MAX_CPU_INSTANCES, cpus)}: rebuild here, or give the server {value} CPUs"
            )
    return refusals, warnings


def check_host(repository: Path | str, flags: Collection[str] | None = None, cpus: int | None = None) -> list[str]:
    """Warn where this host differs from the build's; refuse (TritonHFError) what would answer wrongly here.

    ``flags``, ``cpus``: this host's (hardware.cpu_flags, cpu_count) unless given. Returns the warnings logged.
    """
    location = storage.parse(repository)
    if location.scheme not in ("", "s3"):
        note = f"{location.uri}: the build's CPU choices are not checked here (tritonhf reads local and s3://)"
        logger.warning(note)
        return [note]
    if location.local:  # any Triton repository may be served: read the record without asking for tritonhf's marker
        path = Path(location.uri) / HOST_FILE
        host = HostRecord.from_json(path.read_text()) if path.exists() else None
    else:
        host = read(storage.Files(repository))
    if host is None:
        note = (
            f"{location.uri} has no {HOST_FILE} (built by an older tritonhf): its int8 preset, precision and"
            " instance count are not checked against this host; rebuild it to have them checked"
        )
        logger.warning(note)
        return [note]
    flags, cpus = cpu_flags() if flags is None else flags, cpu_count() if cpus is None else cpus
    refusals, warnings = problems(host, flags, cpus)
    if refusals:
        raise TritonHFError(f"{location.uri} can't be served on this host:\n  " + "\n  ".join(refusals))
    if location.local:
        warnings += tuned_here(Path(location.uri), flags, cpus)
    for line in warnings:
        logger.warning(line)
    return warnings


def tuned_here(repository: Path, flags: Collection[str], cpus: int) -> list[str]:
    """Say where ``tritonhf tune`` measured a repository's choices; warn where this host differs (they still hold,
    but were not measured here)."""
    tuned = {name: entry["tuned"] for name, entry in manifest_if_any(repository).items() if "tuned" in entry}
    if not tuned:
        return []
    first = next(iter(tuned.values()))
    logger.info("tuned on %s (%d CPUs, %s): %s", first["cpu"], first["cpus"], first["date"], ", ".join(tuned))
    here = {flag for flag in RECORDED_FLAGS if flag in flags}
    if set(first["flags"]) == here and first["cpus"] == cpus:
        return []
    there = " ".join(first["flags"]) or "none"
    warning = (
        f"tuned on another machine ({first['cpu']}, {first['cpus']} CPUs, flags {there}): this host has {cpus} CPUs"
        f" and {' '.join(sorted(here)) or 'none'}; run tritonhf tune here to measure it"
    )
    return [warning]


def nfd_label(flag: str) -> str:
    return NFD_PREFIX + flag.replace("_", "").upper()


def any_of(flags: Collection[str]) -> list[dict[str, Any]]:
    """Node selector terms (ORed) for a node with any one of ``flags``."""
    return [{"matchExpressions": [{"key": nfd_label(flag), "operator": "In", "values": ["true"]}]} for flag in flags]


def node_affinity(host: HostRecord | None) -> dict[str, Any] | None:
    """The pod's affinity for the repository's choices: required for what serve would refuse, preferred for
    what it would warn of. None when nothing is needed (or the build predates the record).

    Needs nodes labelled by Node Feature Discovery; without it a refused choice leaves the pod Pending, which is
    the point: it would refuse to serve there anyway. The instance count needs no label: the pod's CPU limit is
    the build's instance count (sizing.Facts.cpus), so the models count as many CPUs as were built for.
    """
    if host is None:
        return None
    required = sorted({n.needs for n in host.choices if n.needs and n.severity == REFUSE})
    preferred = sorted({n.needs for n in host.choices if n.needs and n.severity == WARN} - set(required))
    affinity: dict[str, Any] = {}
    if required:  # every set satisfied: the product of the alternatives, each term one flag from each set
        terms = [
            {"matchExpressions": [e for term in combo for e in term["matchExpressions"]]}
            for combo in itertools.product(*(any_of(needs) for needs in required))
        ]
        affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": terms}
    if preferred:
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {"weight": PREFERRED_WEIGHT, "preference": term} for needs in preferred for term in any_of(needs)
        ]
    return {"nodeAffinity": affinity} if affinity else None
