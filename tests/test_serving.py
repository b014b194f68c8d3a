"""Integration tier: the real tritonserver, served results against in-process references."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tritonhf import TritonHFError, cli, model_config
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import read_manifest
from tritonhf.server import EPHEMERAL_PORTS, TritonServer, free_port
from tritonhf.variants import VARIANTS

from .conftest import CLASSIFIER, EMBEDDER, GEN, GEN_MAX_LEN
from .helpers import NAMES, PROMPTS, alone, assert_same, burst, bytes_input, counters_after, ok, settled_counters

pytestmark = pytest.mark.server

# --- served == in-process Hugging Face -----------------------------------------------------


@pytest.mark.parametrize("source", GEN)
def test_generation_equals_the_pipeline(server: TritonServer, tiny: dict[str, Path], source: str) -> None:
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(tiny[source]), device="cpu")
    for text in PROMPTS[:4]:
        expected = generator(text, max_new_tokens=GEN_MAX_LEN, do_sample=False)[0]["generated_text"]
        assert alone(server, NAMES[source], [text])["text"][0, 0].decode() == expected


def test_classification_equals_the_pipeline(server: TritonServer, tiny: dict[str, Path]) -> None:
    from transformers import pipeline

    expected = pipeline("text-classification", model=str(tiny[CLASSIFIER]), device="cpu")(PROMPTS)
    served = alone(server, CLASSIFIER, PROMPTS)
    assert [label.decode() for label in served["label"][:, 0]] == [e["label"] for e in expected]
    np.testing.assert_allclose(served["score"][:, 0], [e["score"] for e in expected], atol=1e-4)


def test_embedding_equals_sentence_transformers(server: TritonServer, tiny: dict[str, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(tiny[EMBEDDER]), device="cpu").encode(PROMPTS, normalize_embeddings=True)
    served = alone(server, EMBEDDER, PROMPTS)["embedding"]
    assert served.shape == (16, 384)
    assert (served * expected).sum(axis=1).min() >= 0.9999


# --- batching ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", NAMES.values())
def test_batch_invariance(server: TritonServer, model: str) -> None:
    """16 concurrent requests of different lengths: each equals the same request sent alone."""
    expected = [alone(server, model, [text]) for text in PROMPTS]
    before = settled_counters(server, model)
    results = ok(burst(server, model, [[bytes_input([text])] for text in PROMPTS]))
    inferences, executions = counters_after(server, model, before, 16)
    assert inferences == 16
    assert executions < 16, "the burst was batched"
    for got, want in zip(results, expected):
        assert_same(model, got, want)


def test_dynamic_batching_really_batches(server: TritonServer) -> None:
    before = settled_counters(server, CLASSIFIER)
    ok(burst(server, CLASSIFIER, [[bytes_input([PROMPTS[i % 16]])] for i in range(32)]))
    inferences, executions = counters_after(server, CLASSIFIER, before, 32)
    print(
        f"average executed batch size over a 32-request burst: {inferences / executions:.1f} "
        f"({inferences:.0f} / {executions:.0f})"
    )
    assert inferences == 32
    assert inferences / executions >= 4


@pytest.mark.parametrize("model", ["gpt2", CLASSIFIER, EMBEDDER])
def test_a_request_with_three_rows_gets_three_results_in_order(server: TritonServer, model: str) -> None:
    rows = [PROMPTS[5], PROMPTS[0], PROMPTS[11]]
    together = alone(server, model, rows)
    assert all(len(array) == 3 for array in together.values())
    for i, text in enumerate(rows):
        assert_same(model, {name: array[i : i + 1] for name, array in together.items()}, alone(server, model, [text]))


# --- bad input -----------------------------------------------------------------------------


def int32_prompt() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("prompt", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[7]], dtype=np.int32))
    return tensor


BAD = {
    "invalid UTF-8": ([bytes_input([b"caf\xc3("])], "not valid UTF-8"),
    "empty string": ([bytes_input([""])], "prompt row 0 is empty"),
    "wrong input name": ([bytes_input(["hello"], name="text_input")], "unexpected inference input 'text_input'"),
    "wrong dtype": ([int32_prompt()], "data-type is 'INT32', but model"),
    "missing prompt": ([], "got 0 inputs"),
}


@pytest.mark.parametrize("model", ["gpt2", CLASSIFIER])
def test_bad_requests_fail_alone(server: TritonServer, model: str) -> None:
    good = [PROMPTS[3], PROMPTS[9]]
    long_prompt = "very long prompt " * 6000  # 102,000 characters: truncated, documented, served
    requests = [
        [bytes_input([good[0]])],
        *(inputs for inputs, _ in BAD.values()),
        [bytes_input([long_prompt])],
        [bytes_input([good[1]])],
    ]
    results = burst(server, model, requests)
    for (what, (_, message)), result in zip(BAD.items(), results[1:-2]):
        assert isinstance(result, InferenceServerException), what
        assert message in result.message(), (what, result.message())
        assert result.status() in ("StatusCode.INVALID_ARGUMENT", "400"), (what, result.status())
    assert_same(model, results[0], alone(server, model, [good[0]]))
    assert_same(model, results[-1], alone(server, model, [good[1]]))
    truncated = results[-2]
    assert not isinstance(truncated, Exception), truncated
    if model == "gpt2":
        assert truncated["text"][0, 0].decode().startswith(long_prompt)
    else:
        assert truncated["label"][0, 0] in (b"POSITIVE", b"NEGATIVE")
    assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()


ROW_CHECKS = {  # what the model reads in a row with its parameters: refused for that request alone
    "gpt2": [
        ({"chat": True}, ["not json"], "chat: the prompt must be a JSON list of messages"),
        ({"token_ids": True}, ["[1, 1000000000]"], "token_ids: 1000000000 is not a token id of this model"),
        ({"truncate": False, "max_new_tokens": 4}, ["word " * 400], "maximum context length is"),
        ({"chat": True, "token_ids": True}, ["[1]"], "chat and token_ids: a prompt is chat messages or token ids"),
    ],
    EMBEDDER: [
        ({"token_ids": True}, ["[101, 102]", "[101, -3, 102]"], "token_ids: -3 is not a token id of this model"),
        ({"token_ids": True}, ["[101, 102.5]"], "token_ids: the prompt must be a non-empty JSON list of integers"),
        ({"pooling": "cls"}, ["hello"], "unknown parameter 'pooling'; feature-extraction takes 'token_ids'"),
    ],
}


@pytest.mark.parametrize("model", ROW_CHECKS)
def test_a_row_its_model_refuses_fails_its_request_alone(server: TritonServer, model: str) -> None:
    """Rows read with their request's parameters (chat messages, token ids, the context): a bad one is that
    request's error, in the same dynamic batch as good requests that are served as they are alone."""
    good = [PROMPTS[3], PROMPTS[9]]
    bad = ROW_CHECKS[model]
    requests = [[bytes_input([good[0]])], *([bytes_input(rows)] for _, rows, _ in bad), [bytes_input([good[1]])]]
    results = burst(server, model, requests, [{}, *(parameters for parameters, _, _ in bad), {}])
    for (parameters, _, message), result in zip(bad, results[1:-1], strict=True):
        assert isinstance(result, InferenceServerException), parameters
        assert message in result.message() and result.status() == "StatusCode.INVALID_ARGUMENT", result.message()
    assert_same(model, results[0], alone(server, model, [good[0]]))
    assert_same(model, results[-1], alone(server, model, [good[1]]))


# --- the commands around the server --------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_prints_the_tutorial_table(
    server: TritonServer, protocol: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    assert (
        cli.main(["client", "-m", CLASSIFIER, "-i", protocol, "--url", url, "--prompt", "good", "--prompt", "bad"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"Name\s+\| Shape\s+\| Data", lines[0])
    assert [line.split("|")[0].strip() for line in lines[2:]] == ["label", "label", "score", "score"]
    assert all("[2, 1]" in line for line in lines[2:])


def test_client_reports_server_errors(server: TritonServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["client", "-m", "no-such-model", "--url", server.http_url, "--prompt", "x"]) == 1
    assert "no-such-model" in capsys.readouterr().err


def failures(server: TritonServer, model: str) -> int:
    """Requests the server counted as failed for a model (statistics: open to every client)."""
    stats = httpclient.InferenceServerClient(server.http_url).get_inference_statistics(model)
    return stats["model_stats"][0]["inference_stats"]["fail"]["count"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_says_which_model_streams(
    server: TritonServer, protocol: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--stream on a batched model, or none on a stream model: the client says what to use instead, and sends
    nothing (a refused gRPC stream request would hold the model until the next stop's exit timeout)."""
    url = server.http_url if protocol == "http" else server.grpc_url
    before = failures(server, "gpt2"), failures(server, "gpt2_stream")
    assert cli.main(["client", "-m", "gpt2", "--stream", "--url", server.grpc_url, "--prompt", "Hi"]) == 1
    assert capsys.readouterr().err == "tritonhf client: gpt2 is not a stream model: drop --stream, or use gpt2_stream\n"
    assert cli.main(["client", "-m", "gpt2_stream", "-i", protocol, "--url", url, "--prompt", "Hi"]) == 1
    expected = "gpt2_stream is a stream model (it answers piece by piece): add --stream, or use gpt2"
    assert capsys.readouterr().err == f"tritonhf client: {expected}\n"
    assert (failures(server, "gpt2"), failures(server, "gpt2_stream")) == before, "a request was sent"


def test_client_lists_the_models_and_close_names(server: TritonServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["client", "--list", "--url", server.http_url]) == 0
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    manifest = read_manifest(server.repository)  # what the builder wrote, and how each variant is called
    assert listed == {
        name: "streaming" if VARIANTS[m["variant"]].streams else "batched" for name, m in manifest.items()
    }
    assert cli.main(["client", "-m", "gpt", "--url", server.http_url, "--prompt", "x"]) == 1
    assert "no model named gpt is served; did you mean gpt2, gpt2_stream?" in capsys.readouterr().err


def test_http_client_uses_the_batch_axis(server: TritonServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    metadata = client.get_model_metadata(CLASSIFIER)
    assert metadata["inputs"][0]["shape"] == [-1, 1], "the shape the tutorial's client copied"
    from tritonhf.client import infer

    assert infer(CLASSIFIER, ["a", "b", "c"], server.http_url)["label"].shape == (3, 1)


def test_a_model_that_fails_to_load_shows_its_error(tiny: dict[str, Path], tmp_path: Path) -> None:
    """... and the server's log file stays where the message says; after a clean stop, none is left in /tmp."""
    repository = build(
        plan([], [str(tiny[CLASSIFIER])], [], 16), BuildOptions(output=tmp_path / "repo", variants=("python",))
    )
    with TritonServer(repository) as clean:
        assert clean.log_path.is_file()
    assert not clean.log_path.exists(), "a clean stop leaves no log behind"
    config_path = repository / CLASSIFIER / "config.pbtxt"
    config = model_config.read(config_path)
    config["parameters"]["task"] = {"string_value": "summarisation"}
    config_path.write_text(model_config.to_pbtxt(config))
    failing = TritonServer(repository)
    with pytest.raises(TritonHFError, match=r"exited while loading(.|\n)*unknown task 'summarisation'") as caught:
        failing.start(timeout=120)
    assert f"(log: {failing.log_path})" in str(caught.value) and failing.log_path.is_file()
    failing.log_path.unlink()


def test_a_free_port_is_chosen_below_the_ephemeral_range() -> None:
    """Outgoing connections take their source ports from the kernel's ephemeral range: a port chosen there could be
    taken before the server binds it. Nor is a port handed out twice."""
    ephemeral = int(EPHEMERAL_PORTS.read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports) and all(1024 <= port < ephemeral for port in ports), (ports, ephemeral)
