# tritonhf in NVIDIA's Triton container. Triton 2.51.0 is NGC release 24.10, the server
# version the tests run against (pip's nvidia-pytriton 0.7.0 bundles the same 2.51.0).
#   docker build -t tritonhf .
#   docker run --gpus all --shm-size 1g -p 8000-8002:8000-8002 tritonhf
# Build arguments choose the models, exactly as repo_builder.py's flags do.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ARG GEN_MODELS="facebook/opt-125m gpt2"
ARG CLASS_MODELS="distilbert-base-uncased-finetuned-sst-2-english"
ARG EMBED_MODELS=""
ARG DEVICE=gpu
ENV HF_HOME=/opt/hf-cache

WORKDIR /opt/tritonhf
COPY requirements/runtime.txt requirements/runtime.txt
RUN pip install --no-cache-dir -r requirements/runtime.txt
COPY pyproject.toml README.md repo_builder.py client.py ./
COPY tritonhf/ tritonhf/
COPY backends/ backends/
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

# Loading every model at build time validates it and fills HF_HOME, so the server starts offline.
RUN python3 repo_builder.py --output /models --device "$DEVICE" \
        --gen-models "$GEN_MODELS" --class-models "$CLASS_MODELS" --embed-models "$EMBED_MODELS"
ENV HF_HUB_OFFLINE=1

EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models"]
