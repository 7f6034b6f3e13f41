# The two quick-start commands: `make demo` and `make test`.
# Both create .venv on first use and install exactly requirements.lock (every package, direct and
# transitive, pinned with hashes); they re-install only when the lock or pyproject.toml changes.
# `make test-latest` runs the suite on the newest versions the package index serves today;
# `make lock` re-resolves requirements.lock to them and runs the suite (see docs/reproducibility.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
LOCK := requirements.lock
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.7.0
# Empty: torch comes from the lock (the CPU build). A GPU machine names its own build instead, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
# and every other package still comes from the lock.
TORCH_SPEC ?=
# Where the lock's CPU torch (a +cpu local version) is served, when the machine does not already
# have the wheel: e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP := $(VENV)/.setup-stamp
BIN := $(VENV)/bin
LATEST := .latest
PYTEST_ARGS ?= -q

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# Fresh Prefect databases migrate for 25-35 s on a 2-core machine; the 20 s default times out.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: setup demo test lint test-real-size test-latest lock bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
ifeq ($(strip $(TORCH_SPEC)),)
	$(BIN)/python -m pip install -q --require-hashes --no-deps $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -r $(LOCK)
else
	awk '/^torch==/ {skip=1; next} skip && /^ / {next} {skip=0; print}' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(VENV)/lock-without-torch.txt
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
endif
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: setup
	$(BIN)/sae-transfer demo

# The linter first (ruff, configured in pyproject.toml), then the suite.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole study at Qwen1.5-0.5B's real widths (random weights, 2 blocks): ~8 min on 2 cores.
test-real-size: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m real_size

lint: setup
	$(BIN)/ruff check .

# The suite on the newest releases (resolved now, within pyproject's ranges) in $(LATEST)/venv;
# prints which locked versions moved. Exit status is the suite's.
test-latest:
	rm -rf $(LATEST) && mkdir -p $(LATEST)
	$(PYTHON) -m venv $(LATEST)/tools
	$(LATEST)/tools/bin/python -m pip install -q pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)
	$(LATEST)/tools/bin/pip-compile --quiet --upgrade --generate-hashes --allow-unsafe --strip-extras --extra dev \
		--no-emit-index-url --no-emit-find-links --no-emit-trusted-host --output-file $(LATEST)/$(LOCK) pyproject.toml
	sed -i 's#--output-file=$(LATEST)/#--output-file=#' $(LATEST)/$(LOCK)
	-diff <(grep -E '^[A-Za-z0-9_.-]+==' $(LOCK)) <(grep -E '^[A-Za-z0-9_.-]+==' $(LATEST)/$(LOCK)) \
		&& echo "requirements.lock already holds the newest versions"
	$(MAKE) test VENV=$(LATEST)/venv LOCK=$(LATEST)/$(LOCK)

# Re-resolve the lock to the newest versions; it is replaced only when the suite passes on them.
lock: test-latest
	cp $(LATEST)/$(LOCK) $(LOCK)
	@echo "requirements.lock updated: run make test once more and commit it"

# Benchmarks print ratios measured within one run (see docs/benchmarks.md).
bench: setup  # CPU by default; each script also takes --device cuda
	$(BIN)/python bench/bench_cache.py
	$(BIN)/python bench/bench_train.py --threads 1
	$(BIN)/python bench/bench_eval.py --repeats 5
	$(BIN)/python bench/bench_examples.py
	$(BIN)/python bench/bench_crosscoder.py --threads 1

clean:
	rm -rf $(VENV) $(LATEST) results artifacts
