# The two commands: `make book` builds the executed book, `make test` runs every test.
# Each creates .venv on first use and re-installs when the pins change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GOAT_PEER := 0.1.1

.PHONY: book test bench lab clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable ".[book,test]"
	# The authors' package, a peer our tests compare against (never imported by otattn);
	# --no-deps so that its unpinned torch requirement cannot pull another torch build.
	$(PY) -m pip install --quiet --no-deps goat-attention==$(GOAT_PEER)
	touch $@

## book: build the executed HTML book into _build/html (warnings are errors)
book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --warningiserror --nitpick --keep-going

## test: run the test suite, which also executes every chapter in a fresh kernel
test: $(STAMP)
	$(PY) -m pytest

## bench: time and measure the memory of GOAT attention (chapter 8); writes bench.csv and bench.json
## (about 30 minutes on 2 cores; the book's own run is book/data/bench_cpu.csv)
bench: $(STAMP)
	$(PY) -m otattn bench --out bench.csv

## lab: open the chapters as notebooks in JupyterLab (through jupytext)
lab: $(STAMP)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable ".[lab]"
	$(VENV)/bin/jupyter lab book/

clean:
	rm -rf _build .pytest_cache
