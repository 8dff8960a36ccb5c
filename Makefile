# The two set-up commands of the README: `make train` and `make test`; `make bench` for timings.
#
# torch is installed first, on its own, because deepspeed's install pulls a multi-GB CUDA build
# of torch into an environment that has none. TORCH_SPEC picks the build: the default is the CPU
# build these machines carry on disk; GPU users set it (README, "GPU machines").

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test bench train install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) jobs/bench.py

# The embedded default: local Ray, 2 CPU workers, EP=2, tiny preset, the stdlib corpus.
# Extra Hydra overrides: make train ARGS="trainer.max_steps=100".
train: $(STAMP)
	$(PY) jobs/train.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
