# Quick start: `make demo` (sets up, then runs the whole job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tritonhf-setup
# perf_analyzer links libb64; the failover test puts haproxy in front of two servers (README, "Deploy on Kubernetes").
APT_PACKAGES := libb64-0d haproxy
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo lint format test perf bench bench-openai clean

setup: $(STAMP)

# The venv is rebuilt only when the pins or the package metadata change.
$(STAMP): requirements/*.txt pyproject.toml
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_PACKAGES); }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/dev.txt -c requirements/lock-cpu.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	@touch $@

demo: setup
	$(BIN)/tritonhf demo

# ruff's rules and format live in pyproject.toml; `make format` applies the formatter.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Lint first, then the tests. Benchmarks run once, unmeasured, so that they can't rot; `make bench` measures them.
test: setup lint
	$(BIN)/python -m pytest --benchmark-disable $(PYTEST_ARGS)

perf: setup
	$(BIN)/tritonhf perf $(PERF_ARGS)

bench: setup
	$(BIN)/python -m pytest tests/benchmarks --benchmark-enable --benchmark-only --bench-size full \
		--benchmark-autosave --benchmark-storage=file://perf/benchmarks --benchmark-columns=min,median,mean,ops,rounds $(PYTEST_ARGS)

# aiperf against the OpenAI API, beside the same workload straight to Triton (perf/openai_bench.py). aiperf gets a
# venv of its own: its pins conflict with ours.
AIPERF := .venv-aiperf/bin/aiperf
$(AIPERF):
	$(PYTHON) -m venv .venv-aiperf
	.venv-aiperf/bin/pip install -q --disable-pip-version-check aiperf==0.13.0

bench-openai: setup $(AIPERF)
	$(BIN)/python -m tritonhf.perf.openai_bench --aiperf $(AIPERF) $(BENCH_ARGS)

# Generation at the machine's limit: static, padded stream, packed stream under the mixed workload (perf/streaming.py)
bench-streaming: setup
	$(BIN)/python -m tritonhf.perf.streaming $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-aiperf model_repository .cache
