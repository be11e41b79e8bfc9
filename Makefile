# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned (a plain `torch` pulls several GB of CUDA wheels); override e.g. TORCH_SPEC="torch==2.5.1"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH_SPEC)' | tr -c 'A-Za-z0-9.=\n' _)

.PHONY: install demo test test-all bench lint clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/tick-lightning run text_classification --run_dir runs/demo

# CI-sized suite on two pytest-xdist workers (one per core; the tests that launch several processes share one
# worker, tests/conftest.py); `make test-all` adds the `slow` cases (4-process FSDP2, the GPU check's dry run).
# PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup)
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(XDIST) -m "not slow" tests

test-all: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(XDIST) tests

bench: install
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) benchmarks/overhead.py

# The prepared GPU check (benchmarks/gpu_check.sh): installs nothing; uses the venv's python if there is one.
# OUT=dir sets where gpu-check.md goes; `make gpu-check ARGS=--dry-run` checks the commands on any machine.
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash benchmarks/gpu_check.sh $(ARGS)

lint: install
	$(VENV)/bin/ruff check tick_lightning recipes tests benchmarks

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
