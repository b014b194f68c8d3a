"""The GPU path on a CUDA machine: float16 by ``auto``, the ONNX variants on ONNX Runtime's CUDA provider.

CI has no GPU: these tests skip there. On a GPU machine (the GPU install path,
requirements/gpu.txt) they build the tiny models for KIND_GPU instances and
serve them with the real tritonserver.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonhf import model_config
from tritonhf.backends.python_hf.steps import load_step
from tritonhf.backends.python_hf.tasks import load_task
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import read_manifest
from tritonhf.server import TritonServer

from .conftest import CLASSIFIER, GEN_MAX_LEN
from .helpers import PROMPTS, alone

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)"),
]


@pytest.fixture(scope="module")
def gpu_repository(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(
        plan([str(tiny["gpt2"])], [str(tiny[CLASSIFIER])], [], GEN_MAX_LEN),
        BuildOptions(output=tmp_path_factory.mktemp("gpu") / "repo", device="gpu", variants=("python", "onnx")),
    )


def test_auto_is_float16_on_cuda(gpu_repository: Path) -> None:
    config = model_config.read(gpu_repository / CLASSIFIER / "config.pbtxt")
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
    step, _ = load_step(config, gpu_repository / CLASSIFIER / "1", device="cuda:0")
    assert step.precision.dtype == "float16" and step.model.dtype == torch.float16


def test_onnx_runs_on_the_cuda_provider(gpu_repository: Path) -> None:
    import onnxruntime

    assert "CUDAExecutionProvider" in onnxruntime.get_available_providers(), "install requirements/gpu.txt"
    model = gpu_repository / f"{CLASSIFIER}_onnx"
    step, _ = load_step(model_config.read(model / "config.pbtxt"), model / "1", "cuda:0")
    reference = load_task(str(gpu_repository / CLASSIFIER / "1" / "hf_model"), "text-classification", dtype="float32")
    assert step(PROMPTS)["label"].tolist() == reference(PROMPTS)["label"].tolist()


def test_onnx_through_tensorrt_answers_as_through_cuda(gpu_repository: Path) -> None:
    """The tune's "tensorrt" candidate (config parameter onnx_provider): TensorRT's fp16 engines, same labels."""
    import onnxruntime

    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no TensorRT provider")
    model = gpu_repository / f"{CLASSIFIER}_onnx"
    config = model_config.read(model / "config.pbtxt")
    cuda, _ = load_step(config, model / "1", "cuda:0")
    config["parameters"]["onnx_provider"] = {"string_value": "tensorrt"}
    tensorrt, _ = load_step(config, model / "1", "cuda:0")
    assert tensorrt(PROMPTS)["label"].tolist() == cuda(PROMPTS)["label"].tolist()


@pytest.fixture(scope="module")
def gpu_server(gpu_repository: Path) -> Iterator[TritonServer]:
    with TritonServer(gpu_repository) as running:
        yield running


@pytest.mark.server
def test_served_on_the_gpu(gpu_server: TritonServer, gpu_repository: Path, tiny: dict[str, Path]) -> None:
    reference = load_task(str(tiny[CLASSIFIER]), "text-classification", dtype="float32")(PROMPTS)
    for name in (CLASSIFIER, f"{CLASSIFIER}_onnx"):
        got = [alone(gpu_server, name, [text]) for text in PROMPTS]
        assert [g["label"][0, 0] for g in got] == reference["label"][:, 0].tolist(), name
        scores = np.array([g["score"][0, 0] for g in got])
        np.testing.assert_allclose(scores, reference["score"][:, 0], atol=1e-2)
    assert f"{CLASSIFIER} on cuda:0 in float16" in gpu_server.log()
    assert read_manifest(gpu_repository)[CLASSIFIER]["dtype"] == "auto", "a GPU instance decides where it runs"
