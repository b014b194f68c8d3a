"""tritonhf: Hugging Face transformers behind NVIDIA Triton Inference Server, batched."""

import os
from pathlib import Path

__version__ = "0.1.0"


def cache_dir() -> Path:
    """Exports and the server's backend directory: $TRITONHF_CACHE, else ~/.cache/tritonhf."""
    return Path(
        os.environ.get("TRITONHF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tritonhf"
    )


class TritonHFError(Exception):
    """A failure with a message meant for the user; the CLI prints it without a traceback."""
