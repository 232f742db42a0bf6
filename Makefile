# The two commands of the README: `make demo` (the scaling study) and `make test` (the suite).
# Both create and use the project's own virtual environment in .venv from the pinned lock file.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.parallab-installed

.PHONY: demo test unit venv clean bench bench-accelerate

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/parallab sweep --config configs/demo.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

# Hugging Face Accelerate, only as a yardstick, in the benchmark's own environment.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BENCH_VENV)/bin/python || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q -r requirements.lock accelerate==1.15.0
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

bench-accelerate: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/bench_accelerate.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) build src/*.egg-info
