"""The ``tritonhf`` command: build, push, serve, deploy, client, standins, perf, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tritonhf import TritonHFError, client, repo_builder
from tritonhf import kubernetes as k8s
from tritonhf.logs import FORMATS
from tritonhf.server import UNLOAD_S
from tritonhf.tuning import add_goal_arguments, goal_arguments


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tritonhf", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build a model repository (same as repo_builder.py)")
    repo_builder.add_arguments(build)
    build.set_defaults(run=repo_builder.run)

    serve = commands.add_parser("serve", help="start tritonserver on a repository and wait for Ctrl-C")
    serve.add_argument(
        "--model-repository",
        default="model_repository",
        help="a directory, or s3://[host:port/]bucket/prefix, gs://bucket/prefix, as://account/container/prefix"
        " (credentials from the environment; README, 'Model repositories on object storage')",
    )
    serve.add_argument("--http-port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument("--grpc-port", type=int, default=None, help="default: the HTTP port + 1")
    serve.add_argument("--metrics-port", type=int, default=None, help="default: the HTTP port + 2")
    serve.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="the probes' endpoint: /v2/health/ready (every model serving) and /v2/health/live (default: the HTTP"
        " port + 3)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; 0.0.0.0 opens the server to the network (default: %(default)s)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get at shutdown; everything is stopped within this plus"
        f" {UNLOAD_S} s (default: %(default)s)",
    )
    serve.add_argument(
        "--start-timeout",
        type=float,
        default=300.0,
        help="seconds the models may take to load before serve gives up (default: %(default)s)",
    )
    serve.add_argument(
        "--log-format", choices=FORMATS, default="text", help="Triton's and the supervisor's logs (default: text)"
    )
    serve.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="restarts of a crashed model within 10 minutes before serve gives up and exits 1 (default: %(default)s)",
    )
    serve.add_argument(
        "--build",
        default=None,
        help="the build id a local repository must be (its sha256 seal's; a copy somebody else made, such as KServe's"
        " storage initializer's): refused otherwise (default: any sealed build)",
    )
    serve.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        help="a crashed model's reloads wait 0, 1, 2, 4, ... times this many seconds (default: %(default)s)",
    )
    serve.add_argument(
        "--openai-port",
        type=int,
        default=None,
        help="also serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/embeddings) on this"
        " port, supervised with the server (default: off; README, 'OpenAI API')",
    )
    serve.set_defaults(run=run_serve)

    openai = commands.add_parser(
        "openai", help="the OpenAI-compatible API alone, in front of a running tritonserver (README, 'OpenAI API')"
    )
    openai.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC endpoint (default: %(default)s)")
    openai.add_argument("--openai-port", type=int, default=9000, help="default: %(default)s")
    openai.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    openai.add_argument(
        "--grace", type=float, default=30.0, help="seconds in-flight requests get at shutdown (default: %(default)s)"
    )
    openai.set_defaults(run=run_openai)

    push = commands.add_parser("push", help="copy a built repository to object storage (s3://) as a build of its own")
    push.add_argument("repository", type=Path, help="a repository tritonhf built")
    push.add_argument(
        "uri",
        help="s3://[host:port/]bucket/prefix: the build goes to prefix/<build id>/ (credentials: AWS_* in the"
        " environment)",
    )
    push.set_defaults(run=run_push)

    deploy = commands.add_parser("deploy", help="deployment manifests for a built repository")
    targets = deploy.add_subparsers(dest="target", required=True)
    kubernetes = targets.add_parser(
        "kubernetes", help="a kustomize base (Deployment, Service, PDB, HPA, ServiceMonitor) and gpu/kserve overlays"
    )
    k8s.add_arguments(kubernetes)
    kubernetes.set_defaults(run=k8s.run)

    tune = commands.add_parser(
        "tune", help="measure on this machine and write a repository whose plain names serve what won (README, 'Tune')"
    )
    tune.add_argument("--model-repository", type=Path, default=Path("model_repository"), help="a built repository")
    tune.add_argument("--output", type=Path, required=True, help="the tuned repository, written whole")
    tune.add_argument(
        "--models",
        type=repo_builder.model_list,
        default=[],
        help="names to tune (default: every classifier, embedder, generation model and stream)",
    )
    add_goal_arguments(tune.add_argument)
    tune.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer's window (default: %(default)s)")
    tune.add_argument(
        "--no-prescreen",
        dest="prescreen",
        action="store_false",
        help="skip the in-process timing (which drops clear losers and fits each variant's length-bucket overhead)",
    )
    tune.set_defaults(run=run_tune)

    query = commands.add_parser("client", help="query a served model (same as client.py)")
    client.add_arguments(query)
    query.set_defaults(run=client.run)

    standins = commands.add_parser(
        "standins",
        help="write offline stand-ins for the tutorial's models (random weights) and print the build command for them",
    )
    standins.add_argument(
        "--output",
        type=Path,
        default=Path(".cache/standins"),
        help="where, one directory per hub id (default: %(default)s)",
    )
    standins.add_argument(
        "--size",
        choices=("full", "tiny"),
        default="full",
        help="full: the real architectures at full size, for speed; tiny: two layers, for tests (default: %(default)s)",
    )
    standins.set_defaults(run=run_standins)

    perf = commands.add_parser(
        "perf", help="perf_analyzer sweeps over every variant against the tutorial's baseline; report and plot"
    )
    perf.add_argument("--output", type=Path, default=Path("perf/results"))
    perf.add_argument("--workdir", type=Path, default=Path(".cache"))
    perf.add_argument(
        "--class-concurrency",
        type=int_list,
        default=(1, 4, 16, 32, 64),
        help="for the classifier (default: 1,4,16,32,64)",
    )
    perf.add_argument("--gen-concurrency", type=int_list, default=(1, 32), help="for generation (default: 1,32)")
    perf.add_argument(
        "--gen-models",
        type=lambda v: tuple(repo_builder.model_list(v)),
        default=("gpt2", "facebook/opt-125m"),
        help="stand-ins to sweep, '' for none (default: gpt2,facebook/opt-125m)",
    )
    perf.add_argument(
        "--mixed-models",
        type=lambda v: tuple(repo_builder.model_list(v)),
        default=("gpt2",),
        help="served names to run the mixed generation workload on, static vs stream, '' for none (default: gpt2)",
    )
    perf.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="instance kind; fp16 where the variant supports it on gpu",
    )
    perf.add_argument(
        "--window-ms",
        type=int,
        default=4000,
        help="perf_analyzer measurement window; generation above concurrency 1 uses 15 s (default: %(default)s)",
    )
    perf.add_argument(
        "--soak",
        type=float,
        nargs="?",
        const=600.0,
        default=None,
        metavar="SECONDS",
        help="instead: a soak that accounts for every request, supervised (default 600 s)",
    )
    perf.add_argument(
        "--concurrency", type=int, default=64, help="the soak's requests in flight (default: %(default)s)"
    )
    perf.add_argument(
        "--kill-at", type=float, default=None, metavar="SECONDS", help="the soak kills the model's process then"
    )
    perf.set_defaults(run=run_perf)

    demo = commands.add_parser(
        "demo", help="stand-ins + all-MiniLM-L6-v2 -> repository -> server -> client, end to end"
    )
    demo.add_argument("--workdir", type=Path, default=Path(".cache"))
    demo.set_defaults(run=run_demo)
    return root


def int_list(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in repo_builder.model_list(value))


def run_perf(args: argparse.Namespace) -> None:
    from tritonhf.perf import suite

    options = suite.SuiteOptions(
        output=args.output,
        workdir=args.workdir,
        class_concurrency=args.class_concurrency,
        gen_concurrency=args.gen_concurrency,
        gen_models=args.gen_models,
        device=args.device,
        window_ms=args.window_ms,
        mixed_models=args.mixed_models,
    )
    if args.soak:
        suite.run_soak(options, args.soak, args.concurrency, args.kill_at)
    else:
        suite.run(options)


def run_serve(args: argparse.Namespace) -> None:
    from tritonhf.daemon import ServeOptions, serve

    serve(
        ServeOptions(
            repository=args.model_repository,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            host=args.host,
            grace=args.grace,
            start_timeout=args.start_timeout,
            max_restarts=args.max_restarts,
            backoff=args.backoff,
            build=args.build,
            log_format=args.log_format,
            openai_port=args.openai_port,
        )
    )


def run_openai(args: argparse.Namespace) -> None:
    from tritonhf.openai_api import run

    run(args.url, args.host, args.openai_port, args.grace)


def run_push(args: argparse.Namespace) -> None:
    from tritonhf.storage import push

    print(push(args.repository, args.uri))


def run_standins(args: argparse.Namespace) -> None:
    from tritonhf.standins import build_command, write_standins

    paths = write_standins(args.output, args.size)
    for hub_id, path in paths.items():
        print(f"{hub_id:<50} {path}")
    print(f"\nnext, to build a repository from them (offline):\n  {build_command(paths)}")


def run_tune(args: argparse.Namespace) -> None:
    from tritonhf.tune import TuneOptions, tune

    if args.output.resolve() == args.model_repository.resolve():
        raise TritonHFError("--output must differ from --model-repository: the built repository is kept as it is")
    tune(
        TuneOptions(
            args.model_repository,
            args.output,
            tuple(args.models),
            window_ms=args.window_ms,
            prescreen=args.prescreen,
            **goal_arguments(args),
        )
    )


def run_demo(args: argparse.Namespace) -> None:
    from tritonhf.demo import demo

    demo(args.workdir)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except TritonHFError as err:
        if getattr(args, "log_format", "text") == "json":  # serve's last event is JSON like the others
            logging.getLogger("tritonhf").error("tritonhf %s: %s", args.command, err)
        else:
            print(f"tritonhf {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
