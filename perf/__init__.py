"""Measurement: perf_analyzer sweeps over every variant against the tutorial's baseline, the mixed
generation workload, the soak, and the report with its plots (``tritonhf perf``, ``make perf``).

Installed as ``tritonhf.perf`` (see pyproject.toml's package-dir).
"""
