"""The code that runs inside Triton's Python backend: one generic model, per-model differences as data.

The builder copies every module of this directory next to ``model.py`` into
each generated model, so these modules import each other relatively and never
the ``tritonhf`` package. ``model.py`` is the only Triton glue (it adapts
pb_utils requests); everything else is Triton-free and unit-tested without a
server. README.md, "Architecture", walks one request through these files.
"""
