"""``tritonhf tune``'s live half (tune.py) on a real server: the search space read from a built repository, one
server switching candidates by reloading with a config override (never restarting), the checkpoint, and the output
repository: the winner under the plain name, answering as the variant it copies, every variant reachable."""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from tritonhf import TritonHFError, cli, client, model_config, placement, tune
from tritonhf.backends.python_hf.hardware import cpu_count, cpu_flags, memory_limit
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import read_manifest, verify
from tritonhf.server import TritonServer
from tritonhf.supervisor import stubs
from tritonhf.tune import Live, Trials, TuneOptions, configured, read_trials, spaces, write_tuned
from tritonhf.tuning import Candidate, Outcome, Point, Search, Serves

from .conftest import CLASSIFIER
from .helpers import PROMPTS, until

pytestmark = [pytest.mark.server]
INT8 = f"{CLASSIFIER}_onnx-int8"
STREAM = "gpt2_stream"


@pytest.fixture(scope="module")
def built(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    options = BuildOptions(output=tmp_path_factory.mktemp("tune") / "repo", variants=("python", "onnx", "onnx-int8"))
    return build(plan([], [str(tiny[CLASSIFIER])], [], 8), options)


def test_the_space_is_what_was_built(built: Path) -> None:
    [(name, space)] = spaces(built).items()
    assert name == CLASSIFIER
    assert set(space.variants) == {CLASSIFIER, f"{CLASSIFIER}_onnx", INT8}
    assert space.variants[INT8] == ("export",) and space.variants[CLASSIFIER][0] == "float32"
    assert space.default == Candidate(CLASSIFIER, "auto", space.default.instances, 32, 2000)
    with pytest.raises(TritonHFError, match=rf"cannot tune gpt2: not a served model here \(tunable: {CLASSIFIER}\)"):
        spaces(built, ["gpt2"])


def test_a_gpu_build_is_searched_as_one(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A repository built for GPU instances: 1-3 instances, batches up to 256, the float export also through
    TensorRT (config parameter onnx_provider), the generic model in its gated reduced precisions."""
    options = BuildOptions(output=tmp_path / "gpu", variants=("python", "onnx"), device="gpu")
    repository = build(plan([], [str(tiny[CLASSIFIER])], [], 8), options)
    [space] = spaces(repository).values()
    assert space.instances == (1, 2, 3) and space.batch_sizes[-1] == 256 and max(space.delays_us) == 8000
    assert space.variants[f"{CLASSIFIER}_onnx"] == ("export", "tensorrt")
    assert space.variants[CLASSIFIER][0] == "float32" and {"float16"} <= set(space.variants[CLASSIFIER])
    tensorrt = configured(repository, Candidate(f"{CLASSIFIER}_onnx", "tensorrt", 2, 128, 500))
    assert tensorrt["parameters"]["onnx_provider"] == {"string_value": "tensorrt"}
    assert tensorrt["instance_group"] == [{"count": 2, "kind": "KIND_GPU"}] and tensorrt["max_batch_size"] == 128


def failures(workdir: Path) -> str:
    """What a failed trial left: its line in errors.log, perf_analyzer's whole output."""
    return "\n".join(p.read_text() for p in (workdir / "errors.log", workdir / "last.log") if p.exists())


def test_one_server_switches_candidates_by_reloading(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TritonServer(built, models=()) as server:
        live = Live(server, built, tmp_path, window_ms=1000)
        pid = server.process.pid
        for instances in (1, 2):
            candidate = Candidate(INT8, "export", instances, 4, 0)
            point = live(candidate, 2)
            assert point.errors == 0 and point.throughput > 0 and point.p99_ms > 0, (point, failures(tmp_path))
            assert len(stubs(pid, [INT8])) == instances, "the candidate's instances run"
        python = Candidate(CLASSIFIER, "float32", 1, 8, 500)
        live(python, 2)
        assert not stubs(pid, [INT8]), "one model's processes at a time"
        assert server.process.pid == pid and not live.lost, "never restarted"
        assert live.memory[python] > 100 * 2**20, "the server and the model's process, resident"
        monkeypatch.setattr(tune, "MEMORY_SHARE", 0.5 * live.memory[python] / memory_limit())
        assert live(python, 2).errors == 1, "a candidate that holds more than its share of the memory fails"
        assert re.search(r"needs \d+ MiB, over \d+% of this host's \d+ MiB$", (tmp_path / "errors.log").read_text())


def test_an_interrupted_tune_resumes_from_its_trials(built: Path, tmp_path: Path) -> None:
    """A tune cut short by its budget (as by Ctrl-C) leaves its trials; the next one takes them as measured and goes
    on from there: only the deliberate repeats (the noise's, the finals', the tie-breaks') are measured again."""
    [space] = spaces(built).values()
    calls: list[tuple[Candidate, int]] = []

    def measure(candidate: Candidate, concurrency: int) -> Point:  # batches of 8 and more are twice as fast
        calls.append((candidate, concurrency))
        fast = 2 if candidate.max_batch_size >= 8 else 1
        return Point(candidate, concurrency, 50.0 * fast * min(concurrency, 8), 10.0)

    trials = Trials(tmp_path / "trials.csv")
    first = Search(
        space, measure, None, budget=40, on_trial=lambda point, best: trials.add(CLASSIFIER, point, "search")
    )
    first.run()
    done = len(calls)
    resumed = Search(space, measure, None, budget=80)
    resumed.cache.update(read_trials(tmp_path / "trials.csv", CLASSIFIER))
    outcome = resumed.run()
    again = [key for key in calls[done:] if key in first.cache]
    finals = sum(map(len, outcome.finalists.values()))
    print(f"\nfirst {done} measurements; resumed: {len(calls) - done}, of them {len(again)} measured before")
    assert len(resumed.cache) > len(first.cache), "the search went on"
    assert len(again) <= 1 + finals + len(outcome.finalists), "the noise's repeat, the finals, the tie-breaks"


def test_the_output_serves_the_winner_under_the_plain_name(built: Path, tmp_path: Path) -> None:
    [space] = spaces(built).values()
    chosen = Candidate(INT8, "export", 1, 16, 500)
    won = Point(chosen, 8, 500.0, 20.0)
    default = Point(space.default, 8, 250.0, 30.0)
    layouts = {
        INT8: chosen,
        f"{CLASSIFIER}_onnx": Candidate(f"{CLASSIFIER}_onnx", "export", 2, 8, 2000),
        CLASSIFIER: Candidate(CLASSIFIER, "float32", 1, 4, 0),
    }
    outcome = Outcome(chosen, won, default, 0.05, [won, default], {}, "the fastest beyond the noise", layouts)
    output = tmp_path / "tuned"
    write_tuned(built, output, {CLASSIFIER: outcome}, TuneOptions(built, output))
    verify(output)  # sealed anew: serve and deploy take it as it is
    for name, (instances, batch, dtype) in {
        CLASSIFIER: (1, 16, None),
        f"{CLASSIFIER}_onnx": (2, 8, None),
        f"{CLASSIFIER}_python": (1, 4, "float32"),
    }.items():  # the winner under the plain name; every other variant in its own best layout
        config = model_config.read(output / name / "config.pbtxt")
        assert (config["instance_group"][0]["count"], config["max_batch_size"]) == (instances, batch), name
        assert config["parameters"].get("dtype", {}).get("string_value") == dtype, name
    manifest = read_manifest(output)
    assert manifest[CLASSIFIER]["variant"] == "onnx-int8" and manifest[CLASSIFIER]["tuned"]["variant"] == INT8
    assert manifest[f"{CLASSIFIER}_python"]["variant"] == "python"
    assert placement.tuned_here(output, cpu_flags(), cpu_count()) == [], "tuned here: nothing to warn of"
    [warning] = placement.tuned_here(output, {"avx2"}, cpu_count() + 2)
    assert warning.startswith("tuned on another machine") and "run tritonhf tune here" in warning
    prompts = PROMPTS[:4]  # the python layout above batches 4 at most
    with TritonServer(output) as server:
        plain = client.infer(CLASSIFIER, prompts, server.http_url)
        int8 = client.infer(INT8, prompts, server.http_url)
        pytorch = client.infer(f"{CLASSIFIER}_python", prompts, server.http_url)
    with TritonServer(built) as server:
        before = client.infer(CLASSIFIER, prompts, server.http_url)
    np.testing.assert_array_equal(plain["label"], int8["label"])
    np.testing.assert_allclose(plain["score"], int8["score"], rtol=1e-6)
    np.testing.assert_array_equal(pytorch["label"], before["label"])


def test_build_then_tune_from_the_command_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    """``tritonhf build --tune``, whole: built, measured live (a one-minute budget: the default and one more point,
    then the finals), written over the build, sealed, with the trials, the report and the plot beside it."""
    output = tmp_path / "repo"
    argv = ["build", "--gen-models", "", "--class-models", str(tiny[CLASSIFIER]), "--variants", "python,onnx-int8"]
    assert cli.main([*argv, "--output", str(output), "--tune", "--budget-minutes", "1"]) == 0
    verify(output)
    tuned = read_manifest(output)[CLASSIFIER]["tuned"]
    assert tuned["cpus"] == cpu_count() and tuned["throughput"] > 0
    work = output.with_name("repo.tune")
    assert (work / "trials.csv").read_text().count("\n") > 3
    text = (work / "report.md").read_text()
    assert "| tuned:" in text and (work / "candidates.png").stat().st_size > 10_000
    head, finals = text.split("the finals, a race")
    finals, timed = finals.split("in-process, before the live search")
    rows = {part: [line for line in part.splitlines() if line.startswith(f"| {CLASSIFIER}")] for part in (head, timed)}
    assert len(rows[head]) == 2 and len(rows[timed]) >= 2, text  # the default and the tuned; 2+ variants timed
    assert "| chosen |" in finals, text


@pytest.fixture(scope="module")
def generator(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    options = BuildOptions(output=tmp_path_factory.mktemp("tune-gen") / "repo", variants=("python", "stream"))
    return build(plan([str(tiny["gpt2"])], [], [], 8), options)


def test_a_stream_is_tuned_on_its_tokens_within_its_latency_bounds(generator: Path, tmp_path: Path) -> None:
    """A generation model and its stream are each tuned as themselves, on the mixed workload's output tokens/s: the
    stream's running rows are its batch axis (max_running_sequences), its time to first token and inter-token p99
    are bounded, and the output serves the chosen layout."""
    found = spaces(generator)
    assert {name: space.serves for name, space in found.items()} == {"gpt2": Serves.TOKENS, STREAM: Serves.STREAM}
    space = found[STREAM]
    assert (
        space.delays_us == (0,) and space.batch_sizes == (4, 8, 16, 32, 64) and space.variants[STREAM][0] == "float32"
    )
    assert space.prefill_tokens == (8, 16, 32, 64, 128, 512) and found["gpt2"].prefill_tokens == (0,)
    assert space.default == Candidate(STREAM, "auto", space.default.instances, 32, 0, prefill_tokens=512)
    output = tmp_path / "tuned"
    options = TuneOptions(generator, output, (STREAM,), budget_minutes=2, ttft_p99_ms=5000.0, itl_p99_ms=2000.0)
    tune.tune(options)
    verify(output)
    tuned = read_manifest(output)[STREAM]["tuned"]
    config = model_config.read(output / STREAM / "config.pbtxt")
    rows = int(config["parameters"]["max_running_sequences"]["string_value"])
    prefill = int(config["parameters"]["max_prefill_tokens"]["string_value"])
    assert tuned["candidate"].endswith(
        f"{config['instance_group'][0]['count']}x mbs {rows} delay 0us prefill {prefill}"
    ), (tuned, config)
    assert not config.get("max_batch_size") and "dynamic_batching" not in config, "a stream: its scheduler batches"
    assert tuned["throughput"] > 0 and 0 < tuned["ttft_p99_ms"] <= 5000.0 and 0 < tuned["p99_ms"] <= 2000.0
    trials = list(csv.DictReader((options.workdir / "trials.csv").open()))
    assert trials and all(
        row["model"] == STREAM and float(row["ttft_p99_ms"]) > 0 for row in trials if row["errors"] == "0"
    )
    report = (options.workdir / "report.md").read_text()
    assert f"| {STREAM} | tuned: {STREAM} " in report and "tokens/s" in report, report
    with TritonServer(output) as server:
        pieces = list(client.stream(STREAM, PROMPTS[0], server.grpc_url, {"max_new_tokens": 4}))
    assert pieces, "the tuned stream answers"


def test_a_stopped_tune_leaves_no_server_and_keeps_its_trials(built: Path, tmp_path: Path) -> None:
    """SIGTERM (a job stopped, a pod deleted) mid-tune: the server it started (in a session of its own, where the
    signal doesn't reach) stops with it, the output is not written, and the trials so far stay for a resume."""
    output = tmp_path / "tuned"
    argv = [sys.executable, "-m", "tritonhf", "tune", "--model-repository", str(built), "--output", str(output)]
    tuner = psutil.Popen([*argv, "--budget-minutes", "10", "--no-prescreen"], stdout=subprocess.DEVNULL)
    trials = output.with_name("tuned.tune") / "trials.csv"
    until(lambda: trials.exists() and trials.read_text().count("\n") > 1, timeout=240, what="a first trial")
    servers = [p for p in tuner.children(recursive=True) if p.name() == "tritonserver"]
    assert servers, "the tune's server runs"
    tuner.send_signal(signal.SIGTERM)
    assert tuner.wait(timeout=120) != 0
    _, alive = psutil.wait_procs(servers, timeout=30)
    for process in alive:  # not into the rest of the session
        process.kill()
    assert not alive, f"left behind: {alive}"
    assert not output.exists() and trials.read_text().count("\n") > 1
