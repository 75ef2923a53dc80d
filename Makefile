# Two commands set a fresh machine up: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench mincheck clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/connectome demo --out demo_out

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 tests

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_analysis.py
	$(BIN)/python benchmarks/bench_scale.py

# The oldest versions pyproject.toml admits, in a venv of their own, against a test subset.
MINVENV ?= .venv-min
mincheck:
	$(PY) tools/min_versions.py --venv $(MINVENV)

clean:
	rm -rf $(VENV) $(MINVENV) demo_out build *.egg-info
