"""Repository builder and config.pbtxt generation, without a server."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tritonhf import TritonHFError, cli, model_config
from tritonhf.backends.python_hf.hardware import default_instances
from tritonhf.backends.python_hf.parameters import PARAMETERS
from tritonhf.demo import disk_use
from tritonhf.repo_builder import BuildOptions, ModelEntry, add_arguments, build, options_from, plan
from tritonhf.repository import MARKER, read_manifest, runs_this_backend
from tritonhf.server import free_port

from .conftest import CLASSIFIER, EMBEDDER, GEN_MAX_LEN

ROOT = Path(__file__).resolve().parent.parent


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_config_round_trip() -> None:
    config = {
        "name": "m",
        "backend": "python",
        "max_batch_size": 8,
        "input": [{"name": "prompt", "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": "embedding", "data_type": "TYPE_FP32", "dims": [384]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 100},
        "parameters": {"task": {"string_value": "feature-extraction"}},
    }
    text = model_config.to_pbtxt(config)
    parsed = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert parsed == json_format.ParseDict(config, model_config_pb2.ModelConfig())
    assert parsed.output[0].dims == [384]


def test_max_batch_size_zero_is_written() -> None:
    text = model_config.to_pbtxt({"name": "m", "backend": "python", "max_batch_size": 0})
    assert "max_batch_size: 0" in text
    assert text_format.Parse(text, model_config_pb2.ModelConfig()).max_batch_size == 0


def test_misspelt_field_is_rejected() -> None:
    with pytest.raises(json_format.ParseError, match="max_batchsize"):
        model_config.to_pbtxt({"name": "m", "max_batchsize": 8})


def test_defaults_build_the_three_tutorial_models() -> None:
    args = parse()
    entries = plan(args.gen_models, args.class_models, args.embed_models, args.gen_max_len)
    assert [(e.name, e.task) for e in entries] == [
        ("opt-125m", "text-generation"),
        ("gpt2", "text-generation"),
        ("distilbert-base-uncased-finetuned-sst-2-english", "text-classification"),
    ]


def test_empty_value_builds_none_of_that_kind() -> None:
    args = parse("--gen-models", "", "--class-models", "a/b, c", "--embed-models", "x/y z")
    assert args.gen_models == []
    entries = plan(args.gen_models, args.class_models, args.embed_models, 16)
    assert [(e.name, e.task) for e in entries] == [
        ("b", "text-classification"),
        ("c", "text-classification"),
        ("y", "feature-extraction"),
        ("z", "feature-extraction"),
    ]


def test_name_clash_is_refused() -> None:
    with pytest.raises(TritonHFError, match="share the name gpt2"):
        plan(["gpt2", "someone/gpt2"], [], [], 16)


def test_built_configs(repository: Path, entries: list[ModelEntry]) -> None:
    manifest = read_manifest(repository)
    for entry in entries:
        want = {"source": entry.source, "task": entry.task, "variant": "python", "dtype": "float32"}
        assert manifest[entry.name] == want, "the session's repository is built in float32"
    others = {name: served["variant"] for name, served in manifest.items() if served["variant"] != "python"}
    streams = {f"{name}_stream": "stream" for name in ("gpt2", "opt-125m")}
    assert others == streams | {
        f"{m}_{v}": v for m in (CLASSIFIER, EMBEDDER) for v in ("onnx", "onnx-int8", "torchscript")
    }
    modules = {p.name for p in (ROOT / "backends" / "python_hf").glob("*.py")} - {"__init__.py"}
    configs = {e.name: model_config.read(repository / e.name / "config.pbtxt") for e in entries}
    for entry in entries:
        config = configs[entry.name]
        assert config["name"] == entry.name and config["backend"] == "python"
        assert config["max_batch_size"] == 32
        assert config["input"][0] == {"name": "prompt", "data_type": "TYPE_STRING", "dims": ["1"]}
        assert len(config["input"]) == (1 + len(PARAMETERS) if entry.task == "text-generation" else 1)
        assert config["parameters"]["huggingface_model"] == {"string_value": "hf_model"}
        assert config["parameters"]["task"] == {"string_value": entry.task}
        assert "dynamic_batching" in config
        assert (repository / entry.name / "1" / "hf_model" / "config.json").exists(), (
            "self-contained: weights copied in"
        )
        assert {p.name for p in (repository / entry.name / "1").glob("*.py")} == modules, "the whole generic model"
    outputs = {name: [(o["name"], o["data_type"], o["dims"]) for o in c["output"]] for name, c in configs.items()}
    assert outputs["gpt2"] == [
        ("text", "TYPE_STRING", ["1"]),
        ("new_tokens", "TYPE_INT32", ["1"]),
        ("prompt_tokens", "TYPE_INT32", ["1"]),
        ("finish_reason", "TYPE_STRING", ["1"]),
    ]
    assert configs["gpt2"]["parameters"]["max_length"] == {"string_value": str(GEN_MAX_LEN)}
    optional = {i["name"]: i for i in configs["gpt2"]["input"][1:]}
    assert optional["max_new_tokens"] == {
        "name": "max_new_tokens",
        "data_type": "TYPE_INT32",
        "dims": ["1"],
        "optional": True,
    }
    assert optional["stop"] == {
        "name": "stop",
        "data_type": "TYPE_STRING",
        "dims": ["-1"],
        "optional": True,
        "allow_ragged_batch": True,
    }
    assert outputs[CLASSIFIER] == [("label", "TYPE_STRING", ["1"]), ("score", "TYPE_FP32", ["1"])]
    assert outputs[EMBEDDER] == [("embedding", "TYPE_FP32", ["384"]), ("tokens", "TYPE_INT32", ["1"])]


def test_stream_configs(repository: Path) -> None:
    """A stream is decoupled and unbatched for Triton (its scheduler batches), with its bounds as parameters."""
    static, stream = (model_config.read(repository / name / "config.pbtxt") for name in ("gpt2", "gpt2_stream"))
    assert stream["model_transaction_policy"] == {"decoupled": True}
    assert "max_batch_size" not in stream and "dynamic_batching" not in stream
    assert stream["input"] == static["input"] and stream["output"] == static["output"]
    assert stream["parameters"]["max_running_sequences"] == {"string_value": "32"}
    assert stream["parameters"]["max_running_tokens"] == {"string_value": "16384"}
    assert stream["parameters"]["max_prefill_tokens"] == {"string_value": "512"}
    assert stream["parameters"]["prefill_step_slack"] == {"string_value": "1.25"}
    assert stream["parameters"]["stream_interval"] == {"string_value": "1"}
    assert options_from(cli.parser().parse_args(["build", "--gen-stream-interval", "4"])).limits.stream_interval == 4
    assert "max_running_tokens" not in static["parameters"]
    # one running batch over every CPU on a CPU host; the other models one instance per core (hardware.py)
    assert stream["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    assert static["instance_group"][0]["count"] == default_instances("cpu")


def test_a_build_knows_whether_its_models_carry_this_generic_model(repository: Path, tmp_path: Path) -> None:
    """A bench rebuilds its cached repository once backends/python_hf has changed (perf/streaming.py): each
    Python model holds its own copy of that code, which a server would run as it was."""
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy, ignore=shutil.ignore_patterns("hf_model"))
    assert runs_this_backend(copy)
    older = copy / "gpt2_stream" / "1" / "packed.py"
    older.write_text(older.read_text().replace("def ", "def  ", 1))
    assert not runs_this_backend(copy)
    older.unlink()  # a module added since
    assert not runs_this_backend(copy)
    assert not runs_this_backend(tmp_path / "nothing built")


def test_gpu_instances_and_batching_options(tiny: dict[str, Path], tmp_path: Path) -> None:
    options = BuildOptions(
        output=tmp_path / "repo", max_batch_size=64, max_queue_delay_us=500, instances=2, device="gpu", dtype="float16"
    )
    build(plan([], [str(tiny[CLASSIFIER])], [], 16), dataclasses.replace(options, variants=("python",)))
    config = model_config.read(tmp_path / "repo" / CLASSIFIER / "config.pbtxt")
    assert config["max_batch_size"] == 64
    assert config["dynamic_batching"] == {
        "max_queue_delay_microseconds": "500",
        "default_queue_policy": {
            "max_queue_size": 64,
            "default_timeout_microseconds": "10000000",
            "allow_timeout_override": True,  # timeout_action REJECT is the enum's 0: proto3 leaves it out
        },
    }
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_GPU"}]
    assert config["parameters"]["dtype"] == {"string_value": "float16"}


def test_unloadable_model_fails_before_anything_is_written(tiny: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "repo"
    build(plan([], [str(tiny[CLASSIFIER])], [], 16), BuildOptions(output=target, variants=("python",)))
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    with pytest.raises(TritonHFError, match=r"does-not-exist: no such directory"):
        build(
            plan([str(tmp_path / "does-not-exist")], [str(tiny[CLASSIFIER])], [], 16),
            BuildOptions(output=target, variants=("python",)),
        )
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["repo", "repo.build.log"], "no staging directory left behind (the build log stays)"


def test_a_directory_tritonhf_did_not_build_is_not_replaced(tiny: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(TritonHFError, match="not built by tritonhf"):
        build(plan([], [str(tiny[CLASSIFIER])], [], 16), BuildOptions(output=target, variants=("python",)))
    assert (target / "notes.txt").read_text() == "keep me"
    assert not (target / MARKER).exists()


def test_standins_print_the_build_command_that_works_offline(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What ``tritonhf standins`` prints last is a build command that builds the tutorial's three models, offline."""
    root = tiny["gpt2"].parent  # the session's tiny stand-ins: kept, not written again
    assert cli.main(["standins", "--size", "tiny", "--output", str(root)]) == 0
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert command[:2] == ["tritonhf", "build"]
    extra = ["--output", str(tmp_path / "repo"), "--variants", "python", "--dtype", "float32"]
    assert cli.main([*command[1:], *extra]) == 0
    assert set(read_manifest(tmp_path / "repo")) == {"opt-125m", "gpt2", CLASSIFIER}


def test_disk_use_counts_a_hard_linked_file_once(tmp_path: Path) -> None:
    """The demo's last words say what it left on disk: the repository hard-links the stand-ins' weights."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "weights").write_bytes(b"x" * 2**20)
    (tmp_path / "b" / "weights").hardlink_to(tmp_path / "a" / "weights")
    one = disk_use(tmp_path / "a")
    assert one >= 2**20 and disk_use(tmp_path / "b") == one == disk_use(tmp_path / "a", tmp_path / "b")


def test_a_mistyped_path_or_an_unreachable_hub_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path that does not exist fails at once, not after the hub's retries; a hub id that cannot be fetched
    offline points to the stand-ins."""
    import huggingface_hub.constants

    from tritonhf.repo_builder import load

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the hub is not asked
    (tmp_path / "mymodels").mkdir()
    monkeypatch.chdir(tmp_path)
    for source in ("./models/my-gpt2", str(tmp_path / "nope" / "gpt2"), "mymodels/gpt2"):
        with pytest.raises(TritonHFError, match=f"{re.escape(source)}: no such directory"):
            load(plan([source], [], [], 8), "float32")
    with pytest.raises(TritonHFError, match=r"(?s)cannot be reached from here.*tritonhf standins"):
        load(plan(["someone/not-cached-here"], [], [], 8), "float32")
    # online, but the hub does not answer (here: a closed port): said before any download and its retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TritonHFError, match=r"(?s)^someone/not-cached-here: not in the local Hugging Face cache\n.*"):
        load(plan(["someone/not-cached-here"], [], [], 8), "float32")
