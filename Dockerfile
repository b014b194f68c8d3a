# tritonhf in NVIDIA's Triton container. Triton 2.51.0 is NGC release 24.10, the server
# version the tests run against (pip's nvidia-pytriton 0.7.0 bundles the same 2.51.0).
#   docker build -t tritonhf .
#   docker run --gpus all --shm-size 1g -p 8000-8003:8000-8003 -p 9000:9000 tritonhf
# Build arguments choose the models, exactly as repo_builder.py's flags do.
# tests/test_packaging.py assembles exactly what the COPY lines name, installs it and runs
# repo_builder.py from it, so a file missing here fails `make test`.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ARG GEN_MODELS="facebook/opt-125m gpt2"
ARG CLASS_MODELS="distilbert-base-uncased-finetuned-sst-2-english"
ARG EMBED_MODELS=""
ARG DEVICE=gpu
ENV HF_HOME=/opt/hf-cache

WORKDIR /opt/tritonhf
COPY requirements/base.txt requirements/runtime.txt requirements/gpu.txt requirements/
# The GPU path's ONNX Runtime is the CUDA build (requirements/gpu.txt); the CPU path's is runtime.txt.
RUN pip install --no-cache-dir -r "requirements/$([ "$DEVICE" = gpu ] && echo gpu || echo runtime).txt"

# Installed from a build directory, not the working directory: a script run beside the sources would
# import tritonhf from them, where backends/ and perf/ are not yet tritonhf.backends and tritonhf.perf.
COPY pyproject.toml README.md /build/tritonhf/
COPY tritonhf/ /build/tritonhf/tritonhf/
COPY backends/ /build/tritonhf/backends/
COPY perf/ /build/tritonhf/perf/
RUN pip install --no-cache-dir --no-deps --no-build-isolation /build/tritonhf && rm -rf /build/tritonhf
COPY repo_builder.py client.py ./

# Loading every model at build time validates it and fills HF_HOME, so the server starts offline.
RUN python3 repo_builder.py --output /models --device "$DEVICE" \
        --gen-models "$GEN_MODELS" --class-models "$CLASS_MODELS" --embed-models "$EMBED_MODELS"
ENV HF_HUB_OFFLINE=1

# Non-root from here: the NGC image's triton-server user (uid 1000), as the Kubernetes manifests run it.
USER 1000:1000
# HTTP, gRPC, metrics, serve's probes (/v2/health/ready and /live on 8003: README, "Probes that tell the truth"),
# and the OpenAI-compatible API (/v1/..., and its own /metrics: README, "OpenAI API")
EXPOSE 8000 8001 8002 8003 9000
# tritonhf serve runs the tritonserver on PATH under its supervisor: a model whose backend process dies is
# reloaded, readiness is false meanwhile, SIGTERM drains. The container opens the ports to the network.
STOPSIGNAL SIGTERM
# --grace 15: drains 15 s and stops everything within 25 s, inside Kubernetes' default 30 s termination grace
# period (docker stop: use -t 30). `tritonhf deploy kubernetes` passes its own --grace and grace period.
CMD ["tritonhf", "serve", "--model-repository", "/models", "--host", "0.0.0.0", "--grace", "15", "--openai-port", "9000"]
