# The front door: every target sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint fmt demo bench dist clean

install: $(STAMP)

# torch==2.13.0 first: its CPU wheel lies on this machine's disk, while an open range
# would pull a multi-GB CUDA build. pyproject.toml itself asks only for torch>=2.2.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check fc2conv_cli tests bench
	$(BIN)/ruff format --check fc2conv_cli tests bench
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff check --fix fc2conv_cli tests bench
	$(BIN)/ruff format fc2conv_cli tests bench

demo: install
	$(BIN)/python bench/zoo.py vgg16 demo/vgg16.safetensors
	$(BIN)/fc2conv convert demo/vgg16.safetensors --map vgg16 \
		-o demo/vgg16_fcn.safetensors --force

bench: install
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_batch.py
	$(BIN)/python bench/bench_formats.py

# sdist and wheel into dist/, then twine's check of their metadata. Built with the venv's
# own setuptools (--no-isolation): no download, and the same build on every run.
dist: install
	rm -rf dist build
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/twine check --strict dist/*

clean:
	rm -rf $(VENV) demo .pytest_cache dist build
