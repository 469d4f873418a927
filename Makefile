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

## precision: GOAT's error against float64 in float32, bfloat16 and float16, beside plain SDPA
## and the fair baseline (chapter 9), then the speed of the re-centred float32 kernel; writes
## precision.csv and recentred_speed.csv (measured: about 28 and 10 minutes on one thread;
## the book's own runs are book/data/precision_cpu.csv and book/data/recentred_speed_cpu.csv)
.PHONY: precision
precision: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m otattn precision --out precision.csv
	OMP_NUM_THREADS=1 $(PY) -m otattn.experiments.recentred_speed \
	  --lengths 2048 4096 8192 16384 --repeats 5 --out recentred_speed.csv

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
	  --samples 16 --keep-weights goat rope

## bench-layers: whole layers at long context (chapter 11): plain, RoPE, RoPE with the G1
## gate, GOAT, forward and forward+backward, time and peak memory; writes
## bench_layers.csv (the book's own run is book/data/bench_layers_cpu.csv)
.PHONY: bench-layers
bench-layers: $(STAMP)
	$(PY) -m otattn bench --lengths 2048 4096 --repeats 5 --methods sdpa \
	  plain_layer rope_layer gated_layer goat_layer --out bench_layers.csv

## shakespeare: the full experiment of chapter 12, a character language model on eight
## Shakespeare plays (the task `shakespeare`): 7 attention variants x 3 seeds trained at
## context 256 (two runs at a time, one thread each), a learning-rate sweep (RoPE vs the
## G1 elementwise gate, 3 rates, seed 0), then the probes of every run (first-token mass,
## activations, GOAT's u(j) and signal vs sink, gates, loss spikes, loss at 1-8x the
## context, a sample, decoding tokens/s); writes book/data/shakespeare_runs/ and
## book/data/shakespeare_lr/ (checkpoints stay under runs/).  A rerun skips the runs
## already finished in those folders.
## Sizing, 2 cores: a run trains 400 steps x 16 x 256 = 1.64M tokens.  One-thread runs of
## this model went at 8.5K tokens/s (the pilot, quiet machine; 6.8K on average with its
## evaluations on a shared one), and GOAT at 1.035x RoPE's time (50 steps each, side by
## side, one thread, on a loaded machine: 127.6 s vs 123.3 s); at 7.5K tokens/s a run
## takes 220 s (GOAT 227 s), evaluations (4 x 16 x 256 tokens every 100 steps) about 1%
## more, so 21 runs in 11 rounds of two take 41 min; the rate sweep, 3 rounds of two runs
## of 300 x 16 x 256 = 1.23M tokens, 8 min; the probes about 4 min: 53 min in all (47 at
## 8.5K tokens/s).  A machine busy with other jobs takes longer.
SHAKESPEARE_MODEL := --block-size 256 --n-layer 4 --n-head 4 --n-embd 128 \
  --batch-size 16 --warmup-steps 40 --eval-every 100 --eval-batches 4 --no-progress
SHAKESPEARE_LRS := 1e-2 3e-2 1e-1
.PHONY: shakespeare
shakespeare: $(STAMP)
	$(PY) -m otattn sweep shakespeare $(SHAKESPEARE_MODEL) --steps 400 --lr 1e-2 \
	  --log-every 10 --variants rope alibi goat goat_gate gated_elementwise \
	  gated_headwise sink_logit --seeds 0 1 2 --jobs 2 \
	  --data-dir book/data/shakespeare_runs
	for lr in $(SHAKESPEARE_LRS); do \
	  $(PY) -m otattn sweep shakespeare $(SHAKESPEARE_MODEL) --steps 300 --lr $$lr \
	    --log-every 5 --variants rope gated_elementwise --seeds 0 --jobs 2 \
	    --scratch-dir runs/shakespeare_lr --data-dir book/data/shakespeare_lr/lr$$lr \
	    || exit 1; \
	done
	$(PY) -m otattn probes book/data/shakespeare_runs
	for lr in $(SHAKESPEARE_LRS); do \
	  $(PY) -m otattn probes book/data/shakespeare_lr/lr$$lr \
	    --scratch-dir runs/shakespeare_lr/lr$$lr --length-factors --sample-chars 0 \
	    --throughput-rounds 0 || exit 1; \
	done

## shakespeare-long: can a sink form with longer training?  RoPE and the G1 elementwise gate
## (seed 0) trained 4x longer than in `make shakespeare` (1600 steps, 6.6M tokens each, two
## runs at once), then probed; writes book/data/shakespeare_long/.  Sizing: at the 7.5K
## tokens/s per one-thread run of `make shakespeare`, 15 min of training, 2 of probes.
.PHONY: shakespeare-long
shakespeare-long: $(STAMP)
	$(PY) -m otattn sweep shakespeare $(SHAKESPEARE_MODEL) --steps 1600 --lr 1e-2 \
	  --log-every 10 --variants rope gated_elementwise --seeds 0 --jobs 2 \
	  --data-dir book/data/shakespeare_long
	$(PY) -m otattn probes book/data/shakespeare_long --throughput-rounds 0

## resolution: the full experiment of chapter 13: a tiny ViT (4 layers, 2 heads, width 64,
## patches of 4 pixels) trained on scikit-learn's digits upsampled to 16 pixels, with GOAT's
## 2-D prior, a learned (interpolated) table or no positions, 3 seeds each, two runs at a
## time in one-thread workers, scored at 12 to 32 pixels; writes book/data/resolution/ with
## the weights of seed 0.  Measured: 31 min for the 9 runs on 2 cores shared with another
## two-worker experiment (296-474 s per run); a quiet machine was not timed.
.PHONY: resolution
resolution: $(STAMP)
	$(PY) -m otattn resolution --out-dir book/data/resolution --seeds 0 1 2 --jobs 2 \
	  --eval-sizes 12 16 20 24 32 --keep-weights 0 --no-progress

