# The two quick-start commands: `make demo` and `make test`.
# Both create .venv on first use and re-install only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
# Override to install another torch first, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..." for CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.setup-stamp
BIN := $(VENV)/bin

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# Fresh Prefect databases migrate for 25-35 s on a 2-core machine; the 20 s default times out.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/sae-transfer demo

test: setup
	$(BIN)/python -m pytest -q

# Benchmarks print ratios measured within one run (see README "Benchmarks").
bench: setup  # CPU by default; each script also takes --device cuda
	$(BIN)/python bench/bench_cache.py
	$(BIN)/python bench/bench_train.py --threads 1
	$(BIN)/python bench/bench_eval.py --repeats 5
	$(BIN)/python bench/bench_examples.py
	$(BIN)/python bench/bench_crosscoder.py --threads 1

clean:
	rm -rf $(VENV) results artifacts
