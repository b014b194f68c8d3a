"""The ``tritonhf`` command: build, serve, client, standins, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tritonhf import TritonHFError, client, repo_builder


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tritonhf", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build a model repository (same as repo_builder.py)")
    repo_builder.add_arguments(build)
    build.set_defaults(run=repo_builder.run)

    serve = commands.add_parser("serve", help="start tritonserver on a repository and wait for Ctrl-C")
    serve.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    serve.add_argument("--http-port", type=int, default=8000, help="gRPC and metrics take the next two ports")
    serve.set_defaults(run=run_serve)

    query = commands.add_parser("client", help="query a served model (same as client.py)")
    client.add_arguments(query)
    query.set_defaults(run=client.run)

    standins = commands.add_parser("standins", help="write offline stand-ins for the tutorial's models")
    standins.add_argument("--output", type=Path, default=Path(".cache/standins"))
    standins.add_argument("--size", choices=("full", "tiny"), default="full")
    standins.set_defaults(run=run_standins)

    demo = commands.add_parser("demo", help="stand-ins + all-MiniLM-L6-v2 -> repository -> server -> client, end to end")
    demo.add_argument("--workdir", type=Path, default=Path(".cache"))
    demo.set_defaults(run=run_demo)
    return root


def run_serve(args: argparse.Namespace) -> None:
    from tritonhf.server import serve

    serve(args.model_repository, args.http_port, args.http_port + 1, args.http_port + 2)


def run_standins(args: argparse.Namespace) -> None:
    from tritonhf.standins import write_standins

    for hub_id, path in write_standins(args.output, args.size).items():
        print(f"{hub_id:<50} {path}")


def run_demo(args: argparse.Namespace) -> None:
    from tritonhf.demo import demo

    demo(args.workdir)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except TritonHFError as err:
        print(f"tritonhf {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
