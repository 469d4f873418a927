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
## (about 30 minutes on 2 cores before the six peaked and layer methods of chapter 8 joined
## the default, longer now and not re-timed; the book's own run is book/data/bench_cpu.csv)
bench: $(STAMP)
	$(PY) -m otattn bench --out bench.csv

## bench-peaked: GOAT layers with peaked priors against a plain layer (chapter 8), with
## denormals flushed and then kept; writes bench_peaked.csv and bench_peaked_denormals.csv
## (about 7 minutes on 2 cores; the book's own run is book/data/bench_peaked_cpu.csv)
BENCH_PEAKED := --lengths 2048 4096 8192 --repeats 16 --no-memory --methods sdpa goat \
  goat_alibi goat_sharp plain_layer goat_layer goat_layer_alibi goat_layer_sharp
.PHONY: bench-peaked
bench-peaked: $(STAMP)
	$(PY) -m otattn bench $(BENCH_PEAKED) --out bench_peaked.csv
	$(PY) -m otattn bench $(BENCH_PEAKED) --keep-denormals --out bench_peaked_denormals.csv

## lab: open the chapters as notebooks in JupyterLab (through jupytext)
lab: $(STAMP)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable ".[lab]"
	$(VENV)/bin/jupyter lab book/

## copy-mixture: the full experiment of chapter 10, two sweeps run at once with one thread
## each; writes book/data/copy_mixture/ (lag 1) and book/data/copy_mixture_lag2/ (lag 2)
## and keeps the checkpoints under runs/ (measured: about 26 minutes on 2 cores shared
## with other jobs: a median of 10 to 55 thousand tokens/s per run). A sweep skips the runs
## already in its data folder: remove the two folders first to train everything again.
.PHONY: copy-mixture
copy-mixture: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m otattn sweep copy_mixture --task-option lag=2 \
	  --variants goat rope --seeds 0 1 2 --steps 2000 --eval-every 100 \
	  --eval-batches 16 --log-every 20 --data-dir book/data/copy_mixture_lag2 & lag2=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m otattn sweep copy_mixture \
	  --variants goat rope nope --seeds 0 1 2 --steps 1500 --eval-every 100 \
	  --eval-batches 16 --log-every 20 --data-dir book/data/copy_mixture & lag1=$$!; \
	wait $$lag2 && wait $$lag1

clean:
	rm -rf _build .pytest_cache

## retrieval: the full experiment of chapter 11: 7 attention variants x 3 seeds trained on
## passkey and needle retrieval at length 64 (two runs at a time, one thread each), then
## scored on a depth x length grid up to 32x the training length, with training and
## decoding throughput; writes book/data/retrieval/ (checkpoints stay under runs/).
## A rerun skips the runs already in book/data/retrieval.
RETRIEVAL_TRAIN := --block-size 64 --n-embd 128 --n-layer 2 --n-head 4 --steps 1000 \
  --eval-every 100 --eval-batches 8 --log-every 20
.PHONY: retrieval
retrieval: $(STAMP)
	$(PY) -m otattn sweep retrieval $(RETRIEVAL_TRAIN) --variants goat goat_gate rope \
	  alibi nope sinusoidal learned --seeds 0 1 2 --data-dir book/data/retrieval --jobs 2
	$(PY) -m otattn extrapolate book/data/retrieval --factors 1 2 4 8 16 32 --depths 11 \
	  --samples 32 --keep-weights goat rope
