"""tritonhf: Hugging Face transformers behind NVIDIA Triton Inference Server, batched."""

__version__ = "0.1.0"


class TritonHFError(Exception):
    """A failure with a message meant for the user; the CLI prints it without a traceback."""
