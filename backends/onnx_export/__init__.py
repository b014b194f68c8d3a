"""Build time: export networks for Triton's native backends (onnxruntime, libtorch) and check them.

Each export is declared once (spec.py, from optimum's ONNX configs), made and
cached by exporters.py, and gated by parity.py against PyTorch. Which exports
exist is the variant registry's business (tritonhf/variants.py). This side may
import the Triton-free core of ``python_hf`` (it runs exported files through
the same steps the served models use); ``python_hf`` never imports it.
"""
