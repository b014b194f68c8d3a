"""What runs inside Triton, and what makes it: the two halves of tritonhf's backends.

- ``python_hf/``: the code that runs in Triton's Python backend. The builder
  copies it into every generated model; it imports nothing of ``tritonhf``.
- ``onnx_export/``: build time. It exports networks for Triton's native
  onnxruntime and libtorch backends and checks them against PyTorch.

Installed as ``tritonhf.backends`` (see pyproject.toml's package-dir).
"""
