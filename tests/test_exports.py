"""ONNX / TorchScript exports: parity gates, native configs against the exported files, the exported variants on
the real server (fused on the pip server; the three-step ensemble is served in test_faults.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from tritonclient.utils import InferenceServerException

from tritonhf import TritonHFError, cli, model_config
from tritonhf.backends.onnx_export.parity import Exact
from tritonhf.backends.onnx_export.spec import ExportError, spec_for
from tritonhf.backends.python_hf.tasks import load_task
from tritonhf.ensembles import export_model
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.server import TritonServer
from tritonhf.variants import ONNX, PYTHON_ENSEMBLE, VARIANTS, by_names

from .conftest import CLASSIFIER, EMBEDDER, SERVED_VARIANTS
from .helpers import PROMPTS, alone, burst, bytes_input, in_process, ok

EXPORTED = ("onnx", "onnx-int8", "torchscript")
ONNX_TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}


# --- served exports (fused: runtime auto on the pip server) against the Python-backend model ---


def assert_agree(model: str, variant: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    exact = isinstance(VARIANTS[variant].exporter.gate, Exact)
    if "label" in want:
        assert got["label"].tolist() == want["label"].tolist(), (model, variant)
        if exact:
            np.testing.assert_allclose(got["score"], want["score"], atol=1e-4, err_msg=f"{model}_{variant}")
    else:
        cosine = (got["embedding"] * want["embedding"]).sum(axis=-1)
        assert cosine.min() >= (0.9999 if exact else 0.95), (model, variant, cosine.min())


@pytest.mark.server
@pytest.mark.parametrize("variant", EXPORTED)
@pytest.mark.parametrize("model", [CLASSIFIER, EMBEDDER])
def test_export_agrees_with_the_python_model(server: TritonServer, model: str, variant: str) -> None:
    python = [alone(server, model, [text]) for text in PROMPTS]
    exported = f"{model}_{variant}"
    for text, want in zip(PROMPTS[:3], python):
        assert_agree(model, variant, alone(server, exported, [text]), want)
    for got, want in zip(ok(burst(server, exported, [[bytes_input([text])] for text in PROMPTS])), python):
        assert_agree(model, variant, got, want)


@pytest.mark.server
def test_a_bad_request_fails_alone_in_the_export(server: TritonServer) -> None:
    exported = f"{CLASSIFIER}_onnx"
    results = burst(
        server,
        exported,
        [[bytes_input([PROMPTS[2]])], [bytes_input([b"\xff"])], [bytes_input([""])], [bytes_input([PROMPTS[7]])]],
    )
    assert isinstance(results[1], InferenceServerException) and "not valid UTF-8" in results[1].message()
    assert isinstance(results[2], InferenceServerException) and "prompt row 0 is empty" in results[2].message()
    assert_agree(CLASSIFIER, "onnx", results[0], alone(server, CLASSIFIER, [PROMPTS[2]]))
    assert_agree(CLASSIFIER, "onnx", results[3], alone(server, CLASSIFIER, [PROMPTS[7]]))
    assert_agree(CLASSIFIER, "onnx", alone(server, exported, [PROMPTS[4]]), alone(server, CLASSIFIER, [PROMPTS[4]]))


@pytest.fixture(scope="module")
def python_ensemble(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    entries = plan([], [str(tiny[CLASSIFIER])], [], 16)
    output = tmp_path_factory.mktemp("ens") / "repo"
    options = BuildOptions(output=output, runtime=PYTHON_ENSEMBLE, dtype="float32", variants=SERVED_VARIANTS)
    return build(entries, options)


def test_both_python_layouts_in_process_equal_the_python_model(repository: Path, python_ensemble: Path) -> None:
    """Fused (the session's repository, runtime auto on this server) and the three-step ensemble, run in this
    process from their configs: same answers as the Python model, no server."""
    want = in_process(repository, CLASSIFIER)(PROMPTS)
    for variant in EXPORTED:
        fused = model_config.read(repository / f"{CLASSIFIER}_{variant}" / "config.pbtxt")
        assert fused["backend"] == "python" and fused["parameters"]["step"] == {"string_value": "fused"}
        ensemble = model_config.read(python_ensemble / f"{CLASSIFIER}_{variant}" / "config.pbtxt")
        assert ensemble["platform"] == "ensemble"
        for root in (repository, python_ensemble):
            assert_agree(CLASSIFIER, variant, in_process(root, f"{CLASSIFIER}_{variant}")(PROMPTS), want)


# --- native configs against the exported files --------------------------------------------


@pytest.fixture(scope="module")
def native(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    entries = plan([], [str(tiny[CLASSIFIER])], [str(tiny[EMBEDDER])], 16)
    return build(
        entries,
        BuildOptions(
            output=tmp_path_factory.mktemp("native") / "repo",
            variants=SERVED_VARIANTS,
            runtime="native",
            device="gpu",
            onnx_accelerator="tensorrt",
        ),
    )


def graph_io(tensors: list) -> list[tuple[str, str, list[int]]]:
    """(name, Triton type, dims without the batch axis) of ONNX graph inputs or outputs."""
    return [
        (
            t.name,
            ONNX_TYPES[t.type.tensor_type.elem_type],
            [d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim][1:],
        )
        for t in tensors
    ]


def config_io(tensors: list[dict]) -> list[tuple[str, str, list[int]]]:
    return [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in tensors]


@pytest.mark.parametrize("variant", ["onnx", "onnx-int8"])
@pytest.mark.parametrize("model", [CLASSIFIER, EMBEDDER])
def test_native_onnx_config_matches_the_graph(native: Path, model: str, variant: str) -> None:
    config = model_config.read(native / f"{model}_{variant}_model" / "config.pbtxt")
    assert config["platform"] == "onnxruntime_onnx" and "backend" not in config
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
    assert config["optimization"]["execution_accelerators"]["gpu_execution_accelerator"] == [{"name": "tensorrt"}]
    graph = onnx.load(str(native / f"{model}_{variant}_model" / "1" / "model.onnx")).graph
    assert config_io(config["input"]) == graph_io(list(graph.input))
    assert config_io(config["output"]) == graph_io(list(graph.output))


@pytest.mark.parametrize("model", [CLASSIFIER, EMBEDDER])
def test_native_torchscript_config_matches_the_module(native: Path, model: str) -> None:
    config = model_config.read(native / f"{model}_torchscript_model" / "config.pbtxt")
    assert config["platform"] == "pytorch_libtorch"
    module = torch.jit.load(str(native / f"{model}_torchscript_model" / "1" / "model.pt"))
    arguments = [a.name for a in module.forward.schema.arguments[1:]]
    assert [t["name"] for t in config["input"]] == arguments, "libtorch binds inputs by forward argument name"
    assert {t["data_type"] for t in config["input"]} == {"TYPE_INT64"}
    batch = {name: torch.ones(2, 12, dtype=torch.int64) for name in arguments}
    outputs = module(*batch.values())
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert [t["name"] for t in config["output"]] == [
        f"{t['name'].rsplit('__', 1)[0]}__{i}" for i, t in enumerate(config["output"])
    ]
    assert len(outputs) == len(config["output"])
    for tensor, output in zip(config["output"], outputs):
        assert tensor["data_type"] == "TYPE_FP32" and output.dtype == torch.float32
        assert [int(d) for d in tensor["dims"]] == [-1 if size == 12 else size for size in output.shape[1:]]


def test_ensemble_wiring_is_complete(native: Path) -> None:
    """Every step reads tensors the ensemble has by then, and the ensemble's outputs are produced."""
    for name in (f"{CLASSIFIER}_onnx", f"{EMBEDDER}_torchscript"):
        config = model_config.read(native / name / "config.pbtxt")
        available = {t["name"] for t in config["input"]}
        for step in config["ensemble_scheduling"]["step"]:
            inner = model_config.read(native / step["model_name"] / "config.pbtxt")
            assert set(step["input_map"]) == {t["name"] for t in inner["input"]}, step["model_name"]
            assert set(step["input_map"].values()) <= available, step["model_name"]
            assert set(step["output_map"]) <= {t["name"] for t in inner["output"]}, step["model_name"]
            available |= set(step["output_map"].values())
        assert {t["name"] for t in config["output"]} <= available


# --- export failures and the cache ---------------------------------------------------------


def test_an_undeclared_architecture_fails_clearly(
    tmp_path: Path, tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tiny-xlnet"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny[CLASSIFIER])
    config = transformers.XLNetConfig(vocab_size=len(tokenizer), d_model=32, n_layer=1, n_head=2, d_inner=64)
    transformers.XLNetForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    argv = ["build", "--gen-models", "", "--class-models", str(path), "--output", str(tmp_path / "repo")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "no export declared for architecture 'xlnet'" in err and "Traceback" not in err
    assert not (tmp_path / "repo").exists()
    assert cli.main([*argv, "--variants", "python"]) == 0, "served as the python variant, it is fine"


def test_a_failed_parity_check_names_variant_and_shape(tiny: dict[str, Path], native: Path) -> None:
    task = load_task(str(tiny[CLASSIFIER]), "text-classification")
    spec = spec_for(task.model.config, task.task)
    torch.manual_seed(1)
    other = transformers.DistilBertForSequenceClassification(task.model.config).eval()  # same shapes, other weights
    run = ONNX.exporter.runner(native / f"{CLASSIFIER}_onnx_model" / "1" / "model.onnx", spec)
    with pytest.raises(ExportError, match=r"onnx parity failed at batch 1 x sequence 8: max abs error"):
        ONNX.exporter.gate("onnx", run, spec, other, task.max_tokens, tokenize=None)


def test_a_second_build_reuses_the_exports(tiny: dict[str, Path], native: Path) -> None:
    task = load_task(str(tiny[CLASSIFIER]), "text-classification")
    exported = export_model(CLASSIFIER, str(tiny[CLASSIFIER]), task, by_names(EXPORTED))
    assert [made.cached for made in exported.exports] == [True, True, True]
    for made in exported.exports:
        assert (native / f"{CLASSIFIER}_{made.label}_model" / "1" / made.exporter.file).samefile(
            made.path
        ) or made.path.exists()


def test_unknown_variant_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TritonHFError, match="unknown variants onnx-fp8"):
        build(
            plan([], [str(tiny[CLASSIFIER])], [], 16),
            BuildOptions(output=tmp_path / "r", variants=("python", "onnx-fp8")),
        )
    with pytest.raises(TritonHFError, match="text-generation is served as python, stream, baseline"):
        build(
            plan([str(tiny["gpt2"])], [], [], 16),
            dataclasses.replace(BuildOptions(output=tmp_path / "r"), variants=("onnx",)),
        )
