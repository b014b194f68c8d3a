"""The build host's CPU choices travel with the repository (placement.py): recorded by a real build, checked by
``tritonhf serve`` (warn, or refuse an int8 preset the host lacks the instructions for), scheduled on by ``tritonhf
deploy`` (node affinity on Node Feature Discovery's labels)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tritonhf import TritonHFError, cli, model_config
from tritonhf.backends.python_hf.hardware import (
    CPU_BF16_FLAGS,
    INT8_PRESETS,
    cpu_count,
    cpu_flags,
    cpu_model,
    int8_target,
)
from tritonhf.placement import (
    EVERY_MODEL,
    HOST_FILE,
    INSTANCES,
    INT8,
    NFD_PREFIX,
    PRECISION,
    RECORDED_FLAGS,
    REFUSE,
    WARN,
    HostRecord,
    Need,
    check_host,
    node_affinity,
    write,
)
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import HASHES, read_manifest, seal
from tritonhf.server import free_port

from .conftest import CLASSIFIER
from .test_kubernetes import kubectl, one, render, schemas, validate  # noqa: F401 (kubectl, schemas: fixtures)

INT8_MODEL, TORCHSCRIPT_MODEL = f"{CLASSIFIER}_onnx-int8", f"{CLASSIFIER}_torchscript"
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni"}
ZEN4 = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
ZEN3 = {"avx2", "fma"}
MISSING = next(flag for flag in ("amx_int8", "avx512_vnni", "asimddp") if flag not in cpu_flags())  # here


@pytest.fixture(scope="module")
def placed(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built as a user would (dtype auto, instances from the CPUs), with the int8 and TorchScript exports."""
    return build(
        plan([], [str(tiny[CLASSIFIER])], [], 16),
        BuildOptions(
            output=tmp_path_factory.mktemp("placed") / "repo", variants=("python", "onnx-int8", "torchscript")
        ),
    )


def test_the_build_records_its_host_and_what_each_choice_needs(placed: Path) -> None:
    host = HostRecord.from_json((placed / HOST_FILE).read_text())
    assert (host.cpu, host.cpus) == (cpu_model(), cpu_count())
    assert set(host.flags) == set(RECORDED_FLAGS) & cpu_flags()
    preset = int8_target()
    manifest = read_manifest(placed)
    instances = model_config.read(placed / CLASSIFIER / "config.pbtxt")["instance_group"][0]["count"]
    expected = {
        Need(INT8_MODEL, INT8, preset, INT8_PRESETS[preset], REFUSE if preset == "avx512_vnni" else WARN),
        Need(EVERY_MODEL, INSTANCES, str(instances), cpus=cpu_count()),
    }
    if manifest[TORCHSCRIPT_MODEL]["dtype"] == "bfloat16":  # traced in bf16 on a bf16 CPU: it needs one
        expected.add(Need(TORCHSCRIPT_MODEL, PRECISION, "bfloat16", CPU_BF16_FLAGS))
    assert set(host.choices) == expected, "the python model (dtype auto) chooses where it loads: no record"
    assert f"  {HOST_FILE}\n" in (placed / HASHES).read_text(), "written before the build is sealed"
    assert check_host(placed) == [], "served where it was built: nothing differs"


@pytest.fixture
def record(tmp_path: Path) -> Path:
    """A repository's record as built on a Sapphire Rapids (VNNI preset, TorchScript in bf16, 2 CPUs)."""
    write(
        tmp_path,
        HostRecord(
            "Intel Xeon Platinum 8480+",
            ("amx_bf16", "amx_int8", "avx2", "avx512_bf16", "avx512_vnni"),
            2,
            (
                Need("a_onnx-int8", INT8, "avx512_vnni", INT8_PRESETS["avx512_vnni"], REFUSE),
                Need("b_onnx-int8", INT8, "avx512_vnni", INT8_PRESETS["avx512_vnni"], REFUSE),
                Need("b_torchscript", PRECISION, "bfloat16", CPU_BF16_FLAGS),
                Need(EVERY_MODEL, INSTANCES, "2", cpus=2),
            ),
        ),
    )
    return tmp_path


def test_serving_where_the_int8_preset_lacks_its_instructions_is_refused(record: Path) -> None:
    with pytest.raises(TritonHFError) as refused:
        check_host(record, ZEN3, 2)
    message = str(refused.value)
    assert "a_onnx-int8, b_onnx-int8: the int8 export was quantised with ONNX Runtime's avx512_vnni preset" in message
    assert (
        "with avx512_vnni or amx_int8; this host's CPU" in message and "Rebuild the repository on this CPU" in message
    )
    assert check_host(record, SAPPHIRE_RAPIDS, 2) == [], "the build host's own CPU"


def test_a_host_that_differs_in_what_only_costs_speed_is_warned_of(record: Path) -> None:
    warnings = check_host(record, ZEN3 | {"avx512_vnni"}, 16)
    assert len(warnings) == 2, warnings
    bf16, instances = sorted(warnings, key=lambda line: not line.startswith("b_torchscript"))
    assert bf16.startswith("b_torchscript: compiled in bfloat16") and "amx_bf16 or avx512_bf16 or bf16" in bf16
    assert "2 instances per model, one per CPU of the build host" in instances and "would run 8" in instances
    assert check_host(record, ZEN4, 2) == [], "avx512_bf16 and avx512_vnni: both choices hold"


def test_an_int8_preset_this_host_would_not_choose_is_warned_of(tmp_path: Path) -> None:
    """Built on an AVX2-only CPU, served on a VNNI one: the avx2 preset runs, at 0.8x float32 (VNNI's: 2.7x)."""
    write(tmp_path, HostRecord("AMD EPYC 7B13", ("avx2",), 2, (Need("a_onnx-int8", INT8, "avx2", ("avx2",), WARN),)))
    (warning,) = check_host(tmp_path, SAPPHIRE_RAPIDS, 2)
    assert "a_onnx-int8: int8 preset avx2" in warning and "this host would take avx512_vnni" in warning
    assert check_host(tmp_path, ZEN3, 2) == []


def test_a_build_without_a_record_is_served_with_one_warning(tmp_path: Path) -> None:
    (warning,) = check_host(tmp_path)
    assert f"no {HOST_FILE}" in warning and "not checked" in warning
    (note,) = check_host("gs://bucket/models")
    assert "not checked here" in note


def test_required_affinity_takes_one_flag_of_each_refused_set() -> None:
    host = HostRecord(
        "x",
        (),
        1,
        (
            Need("a", INT8, "avx512_vnni", ("avx512_vnni", "amx_int8"), REFUSE),
            Need("b", INT8, "other", ("avx2",), REFUSE),
            Need("c", PRECISION, "bfloat16", ("avx2",)),  # already required: not preferred as well
        ),
    )
    affinity = node_affinity(host)
    assert affinity is not None
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = [sorted(e["key"].removeprefix(NFD_PREFIX) for e in term["matchExpressions"]) for term in terms]
    assert keys == [["AVX2", "AVX512VNNI"], ["AMXINT8", "AVX2"]]
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in affinity["nodeAffinity"]
    assert node_affinity(HostRecord("x", (), 1, (Need(EVERY_MODEL, INSTANCES, "2", cpus=2),))) is None


@pytest.fixture(scope="module")
def claimed(placed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the real build whose record says its int8 preset needs a flag this machine lacks, and that its
    TorchScript needs bf16; sealed again, as a build on such a CPU would be."""
    copy = tmp_path_factory.mktemp("claimed") / "repo"
    shutil.copytree(placed, copy)
    host = HostRecord(
        "Intel Xeon Platinum 8480+",
        (MISSING,),
        cpu_count(),
        (
            Need(INT8_MODEL, INT8, "avx512_vnni", (MISSING,), REFUSE),
            Need(TORCHSCRIPT_MODEL, PRECISION, "bfloat16", CPU_BF16_FLAGS),
        ),
    )
    write(copy, host)
    seal(copy)
    return copy


def test_serve_refuses_an_int8_preset_this_host_lacks(claimed: Path) -> None:
    """The real CLI, as a pod runs it: it exits with the reason before any server starts."""
    serve = ["serve", "--model-repository", str(claimed), "--http-port", str(free_port())]
    with subprocess.Popen(
        [sys.executable, "-m", "tritonhf", *serve],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as run:
        try:
            stdout, stderr = run.communicate(timeout=180)
        except subprocess.TimeoutExpired:  # it served: stop the server it started too
            os.killpg(run.pid, signal.SIGTERM)
            stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 1, stdout + stderr
    assert f"tritonhf serve: {claimed} can't be served on this host" in stderr, stderr
    assert f"{INT8_MODEL}: the int8 export was quantised with ONNX Runtime's avx512_vnni preset" in stderr
    assert f"made for a CPU with {MISSING}; this host's CPU" in stderr and "Rebuild the repository" in stderr


def test_deploy_schedules_on_the_flags_the_choices_need(
    claimed: Path,
    tmp_path: Path,
    kubectl: str,  # noqa: F811 (the fixture imported above)
    schemas: Path,  # noqa: F811
) -> None:
    """Required: the refused choice's flag; preferred: any native bf16; in the Deployment and KServe's runtime."""
    output = tmp_path / "k8s"
    argv = ["deploy", "kubernetes", "--model-repository", "/models", "--built", str(claimed)]
    assert cli.main([*argv, "--output", str(output)]) == 0
    label = NFD_PREFIX + MISSING.replace("_", "").upper()
    required = {"nodeSelectorTerms": [{"matchExpressions": [{"key": label, "operator": "In", "values": ["true"]}]}]}
    preferred = [NFD_PREFIX + flag for flag in ("AMXBF16", "AVX512BF16", "BF16")]
    for overlay, kind in (("", "Deployment"), ("overlays/kserve", "ServingRuntime")):
        body = one(render(kubectl, output / overlay), kind)
        validate(body, schemas)
        spec = body["spec"]["template"]["spec"] if kind == "Deployment" else body["spec"]
        affinity = spec["affinity"]["nodeAffinity"]
        assert affinity["requiredDuringSchedulingIgnoredDuringExecution"] == required, kind
        terms = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
        assert [term["preference"]["matchExpressions"][0]["key"] for term in terms] == preferred, kind
        assert all(term["weight"] == 50 for term in terms)
