# `make demo` and `make test` each work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# torch is pinned here, not in pyproject, so pip takes the local build instead of downloading another.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,peers,serve,deepspeed,tune,vl]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(OFFLINE) $(PY) scripts/demo.py

test: install
	$(OFFLINE) $(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 --doctest-modules tests dept dept_nlp dept_vl

lint: install
	$(VENV)/bin/ruff check .
	$(PY) -m mypy  # dept/, configured in pyproject.toml

bench: install
	$(OFFLINE) $(PY) scripts/benchmark.py --sizes small --output_dir bench_output --overwrite

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
