"""Precision, process layout and the int8 preset: what the hardware decides, and the build's parity gate.

The hardware rules are tested on given CPU flags (any machine's answer is
known); the build and the served model on this machine's own CPU, asserting
whichever answer its flags call for.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tritonhf import cli, model_config, precision, repo_builder
from tritonhf.backends.python_hf import hardware, steps
from tritonhf.backends.python_hf.hardware import Choice, choose, cpu_bf16, cpu_flags, int8_target
from tritonhf.backends.python_hf.steps import load_step
from tritonhf.backends.python_hf.tasks import load_task
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import read_manifest
from tritonhf.server import TritonServer

from .conftest import CLASSIFIER, GEN_MAX_LEN
from .helpers import PROMPTS, alone

SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni"}
ZEN3 = {"avx2", "fma"}
GRAVITON3 = {"asimd", "asimddp", "bf16", "sve"}


@pytest.mark.parametrize(
    ("flags", "bf16", "int8"),
    [(SAPPHIRE_RAPIDS, "amx_bf16", "avx512_vnni"), (ZEN3, None, "avx2"), (GRAVITON3, "bf16", "arm64")],
)
def test_the_cpu_decides(flags: set[str], bf16: str | None, int8: str) -> None:
    assert cpu_bf16(flags) == bf16 and int8_target(flags) == int8
    assert choose("auto", "cpu", ["bfloat16"], flags).dtype == ("bfloat16" if bf16 else "float32")


def test_auto_takes_only_what_the_gate_passed() -> None:
    assert choose("auto", "cpu", [], SAPPHIRE_RAPIDS) == Choice("float32", "bfloat16 did not pass the parity gate")
    assert choose("auto", "cpu", ["bfloat16"], ZEN3).reason == "no native reduced precision on this device"
    assert choose("bfloat16", "cpu", [], ZEN3).dtype == "float32", "asked for, but not verified"
    assert choose("bfloat16", "cpu", ["bfloat16"], ZEN3) == Choice("bfloat16", "requested")
    assert choose("float32", "cpu", [], SAPPHIRE_RAPIDS).dtype == "float32"


def test_the_gate_is_for_any_host_unless_told_this_one() -> None:
    """A repository is served elsewhere, so auto gates bf16 wherever built; --gate-for this-host skips the gate (and
    bf16) on a CPU without native bf16, where it would take minutes for a precision this host never picks."""
    assert precision.gated("auto", "cpu", "any-host", ZEN3) == ["bfloat16"]
    assert precision.gated("auto", "cpu", "this-host", ZEN3) == []
    assert precision.gated("auto", "cpu", "this-host", SAPPHIRE_RAPIDS) == ["bfloat16"]
    assert precision.gated("bfloat16", "cpu", "this-host", ZEN3) == ["bfloat16"], "asked for: gated"
    assert precision.gated("auto", "gpu", "this-host", ZEN3) == ["float16", "bfloat16"], "the GPU decides"
    args = cli.parser().parse_args(["build", "--gate-for", "this-host"])
    assert repo_builder.options_from(args).gate_for == "this-host"


def test_in_process_auto_without_a_gate_is_float32(tiny: dict[str, Path]) -> None:
    task = load_task(str(tiny[CLASSIFIER]), "text-classification")
    assert task.precision.dtype == "float32" and str(task.model.dtype) == "torch.float32"


def test_cpu_flags_are_read_from_the_kernel(tmp_path: Path) -> None:
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"} and cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def cgroup_files(layout: str, quota: str, period: str) -> dict[str, str]:
    """A container's CPU limit as each cgroup layout writes it (no limit: v2 ``max``, v1 ``-1``)."""
    if layout == "v2":
        return {"cpu.max": f"{quota.replace('-1', 'max')} {period}\n"}
    return {f"{layout}/cpu.cfs_quota_us": f"{quota}\n", f"{layout}/cpu.cfs_period_us": f"{period}\n"}


@pytest.mark.parametrize("layout", ["v2", "cpu", "cpu,cpuacct"])  # cgroup v2; v1's cpu controller, both mounts
def test_a_cgroup_cpu_limit_caps_the_cpus(layout: str, tmp_path: Path) -> None:
    for quota, cpus in (("-1", None), ("200000", 2), ("150000", 2), ("50000", 1)):
        root = tmp_path / quota
        for name, text in cgroup_files(layout, quota, "100000").items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        assert hardware.cpu_quota(root) == cpus, (layout, quota)
    assert hardware.cpu_quota(tmp_path / "missing") is None


def test_threads_share_the_cpus_among_instances(tiny: dict[str, Path], tmp_path: Path) -> None:
    cores = hardware.cpu_count()
    assert hardware.cpu_threads("auto", 1) == cores and hardware.cpu_threads("auto", 2 * cores) == 1
    assert hardware.cpu_threads("3", 1) == 3
    assert hardware.default_instances("gpu") == 1
    assert hardware.default_instances("cpu") == min(hardware.MAX_CPU_INSTANCES, cores)
    repository = build(
        plan([], [str(tiny[CLASSIFIER])], [], 16),
        BuildOptions(output=tmp_path / "repo", variants=("python",), instances=2, dtype="float32"),
    )
    config = model_config.read(repository / CLASSIFIER / "config.pbtxt")
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    _, context = load_step(config, repository / CLASSIFIER / "1")
    assert context.parameters["cpu_threads"] == str(max(1, cores // 2))


def test_a_model_is_loaded_on_a_thread_that_ends(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Its OpenMP team ends with that thread, so the thread that computes afterwards has the cores to itself
    (hardware.on_a_thread_that_ends: a team left behind on the caller's thread made a stream's steps 1.6x slower)."""
    built_on: list[threading.Thread] = []
    monkeypatch.setattr(steps, "step_factory", lambda step: lambda context: built_on.append(threading.current_thread()))
    steps.load_step({"input": [], "output": []}, tmp_path)
    assert built_on and built_on[0] is not threading.current_thread() and not built_on[0].is_alive()


@pytest.fixture(scope="module")
def auto_repository(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built as a user would: dtype auto, default layout, the python and TorchScript variants."""
    return build(
        plan([str(tiny["gpt2"])], [str(tiny[CLASSIFIER])], [], GEN_MAX_LEN),
        BuildOptions(output=tmp_path_factory.mktemp("auto") / "repo", variants=("python", "torchscript")),
    )


def verified(repository: Path, name: str) -> list[str]:
    parameters = model_config.read(repository / name / "config.pbtxt")["parameters"]
    return [d for d in parameters["verified_dtypes"].get("string_value", "").split(",") if d]


def test_auto_build_gates_bfloat16_and_records_it(auto_repository: Path) -> None:
    manifest = read_manifest(auto_repository)
    for name in ("gpt2", CLASSIFIER):
        config = model_config.read(auto_repository / name / "config.pbtxt")
        assert config["parameters"]["dtype"] == {"string_value": "auto"}
        want = "bfloat16" if cpu_bf16() and "bfloat16" in verified(auto_repository, name) else "float32"
        assert manifest[name]["dtype"] == want
    for name in ("gpt2", CLASSIFIER):  # the config holds what the gate decided (its verdict, from the build's cache)
        task = load_task(manifest[name]["source"], manifest[name]["task"], dtype="float32")
        verdict = precision.gate(name, manifest[name]["source"], task, "bfloat16")
        assert verdict.cached and verified(auto_repository, name) == (["bfloat16"] if verdict.passed else [])
    torchscript = manifest[f"{CLASSIFIER}_torchscript"]
    assert torchscript["dtype"] == manifest[CLASSIFIER]["dtype"], "traced in the build's precision"
    module = torch.jit.load(str(auto_repository / f"{CLASSIFIER}_torchscript" / "1" / "model.pt"))
    ids = torch.ones(2, 12, dtype=torch.int64)
    assert module(ids, ids)[0].dtype == torch.float32, "declared TYPE_FP32 for libtorch, whatever it computes in"


def test_native_cpu_networks_get_their_threads(tiny: dict[str, Path], tmp_path: Path) -> None:
    repository = build(
        plan([], [str(tiny[CLASSIFIER])], [], 16),
        BuildOptions(output=tmp_path / "repo", runtime="native", variants=("onnx", "torchscript"), instances=2),
    )
    threads = str(hardware.cpu_threads("auto", 2))
    onnx = model_config.read(repository / f"{CLASSIFIER}_onnx_model" / "config.pbtxt")["parameters"]
    assert onnx == {"intra_op_thread_count": {"string_value": threads}}
    libtorch = model_config.read(repository / f"{CLASSIFIER}_torchscript_model" / "config.pbtxt")["parameters"]
    assert libtorch["INTRA_OP_THREAD_COUNT"] == {"string_value": threads}
    assert libtorch["DISABLE_OPTIMIZED_EXECUTION"] == {"string_value": "true"}


def test_a_failed_gate_serves_float32(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(precision, "MIN_AGREEMENT", 1.01)  # no model can pass: the fallback's wiring is under test
    repository = build(
        plan([], [str(tiny[CLASSIFIER])], [], 16), BuildOptions(output=tmp_path / "repo", variants=("python",))
    )
    assert verified(repository, CLASSIFIER) == [] and read_manifest(repository)[CLASSIFIER]["dtype"] == "float32"
    out = capsys.readouterr().out
    assert f"{CLASSIFIER}: bfloat16 failed the parity gate; it serves float32 instead" in out
    assert "| argmax agreement |" in out and "FAIL" in out
    served, _ = load_step(model_config.read(repository / CLASSIFIER / "config.pbtxt"), repository / CLASSIFIER / "1")
    assert served.precision.dtype == "float32"
    if cpu_bf16():
        assert served.precision.reason == "bfloat16 did not pass the parity gate"


def overflow_float16(model: Any) -> None:
    """Word embeddings x 1e7: past float16's largest value (65504) they are inf, and everything after is NaN.
    float32 doesn't notice: the embeddings' LayerNorm takes the scale out again."""
    model.distilbert.embeddings.word_embeddings.weight.mul_(1e7)


def offset_logits(model: Any) -> None:
    """Both classes' logits + 1000: softmax takes the shift out in float32, but at 1000 bfloat16's 8-bit mantissa
    steps by 4, and the margins between the classes (hundredths) round away."""
    model.classifier.bias.add_(1000.0)


@pytest.mark.parametrize(("dtype", "defect"), [("float16", overflow_float16), ("bfloat16", offset_logits)])
def test_the_gate_rejects_a_precision_that_breaks_the_model(
    tiny: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    dtype: str,
    defect: Callable[[Any], None],
) -> None:
    """The same classifier, sound and with a defect that only ``dtype`` feels, gated in one build in ``dtype``
    (asked for explicitly: the host's CPU flags decide nothing here): the sound one passes and serves in it, the
    broken one fails and serves float32, and the build says so."""
    broken = tmp_path / f"{defect.__name__.replace('_', '-')}"
    shutil.copytree(tiny[CLASSIFIER], broken)
    task = load_task(str(broken), "text-classification", dtype="float32")
    with torch.no_grad():
        defect(task.model)
    task.model.save_pretrained(broken)
    sound = load_task(str(tiny[CLASSIFIER]), "text-classification", dtype="float32")
    assert (task(PROMPTS)["label"] == sound(PROMPTS)["label"]).all(), "the defect is invisible in float32"
    repository = build(
        plan([], [str(tiny[CLASSIFIER]), str(broken)], [], 16),
        BuildOptions(output=tmp_path / "repo", variants=("python",), dtype=dtype),
    )
    out = capsys.readouterr().out
    manifest = read_manifest(repository)
    assert verified(repository, CLASSIFIER) == [dtype] and manifest[CLASSIFIER]["dtype"] == dtype, out
    assert verified(repository, broken.name) == [] and manifest[broken.name]["dtype"] == "float32", out
    assert f"{broken.name}: {dtype} failed the parity gate; it serves float32 instead" in out
    [verdict] = precision.verify([(broken.name, str(broken), task)], dtype, "cpu")[broken.name]
    assert verdict.cached and verdict.dtype == dtype and not verdict.passed
    assert verdict.checks["argmax agreement"] < 0.5, "wrong on most prompts, not a near miss"


def test_generation_gate_figures(tiny: dict[str, Path]) -> None:
    task = load_task(str(tiny["gpt2"]), "text-generation", max_length="8")
    same = precision.generation_checks(task, task)  # a model against itself agrees on every token
    assert same == {"next-token agreement": 1.0, "greedy prefix": 1.0}
    assert precision.common_prefix([1, 2, 3], [1, 2, 4]) == 2 and precision.common_prefix([1], [1, 2]) == 1


@pytest.fixture(scope="module")
def auto_server(auto_repository: Path) -> Iterator[TritonServer]:
    with TritonServer(auto_repository) as running:
        yield running


@pytest.mark.server
def test_served_in_the_chosen_precision(
    auto_server: TritonServer, auto_repository: Path, tiny: dict[str, Path]
) -> None:
    """The server's model loads in what the manifest says, and answers as the float32 model does."""
    dtype = read_manifest(auto_repository)[CLASSIFIER]["dtype"]
    reference = load_task(str(tiny[CLASSIFIER]), "text-classification", dtype="float32")(PROMPTS)
    for variant in (CLASSIFIER, f"{CLASSIFIER}_torchscript"):
        got = [alone(auto_server, variant, [text]) for text in PROMPTS]
        assert [g["label"][0, 0] for g in got] == reference["label"][:, 0].tolist(), variant
        scores = np.array([g["score"][0, 0] for g in got])
        np.testing.assert_allclose(scores, reference["score"][:, 0], atol=2e-2 if dtype == "bfloat16" else 1e-4)
    assert f"{CLASSIFIER} on cpu in {dtype}" in auto_server.log()


@pytest.mark.parametrize("name", hardware.MEMORY_LIMIT_FILES)
def test_a_cgroup_memory_limit_caps_the_memory(name: str, tmp_path: Path) -> None:
    host = hardware.memory_limit(tmp_path / "missing")
    assert host > 2**30, "no cgroup: the host's memory"
    for written, limit in (("max", host), (str(2**30), 2**30), (str(2**62), host)):  # v1's "none" is a huge number
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"{written}\n")
        assert hardware.memory_limit(tmp_path) == limit, written


def test_onnx_runtime_providers_per_device() -> None:
    """A CPU instance runs on the CPU whatever the config asks; on a GPU, CUDA's kernels, or TensorRT's fp16
    engines (cached) with CUDA behind them for what TensorRT won't take, and the CPU last."""
    assert hardware.execution_providers("cpu", hardware.TENSORRT) == ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": 1})
    assert hardware.execution_providers("cuda:1") == [cuda, "CPUExecutionProvider"]
    (name, options), *rest = hardware.execution_providers("cuda:1", hardware.TENSORRT)
    assert name == "TensorrtExecutionProvider" and rest == [cuda, "CPUExecutionProvider"]
    assert options["device_id"] == 1 and options["trt_fp16_enable"] and options["trt_engine_cache_enable"]
    with pytest.raises(ValueError, match="onnx_provider 'tensorrt10': one of cuda, tensorrt"):
        hardware.execution_providers("cuda:0", "tensorrt10")
