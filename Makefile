# Every user-facing command of the project. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATASET ?= egoschema
CAPTIONER ?= mmser
ARGS ?=
# Keep vLLM's compile cache and Ray's temp files inside the checkout, not in $HOME.
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export HF_HUB_OFFLINE ?= 1

.PHONY: help install demo test lint videoqa serve-reader train bench-decode bench-captioner \
	bench-reader bench-pipeline bench-captioners bench-learn bench-captioning bench-cluster \
	eval-captions data compare report clean

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

install: $(STAMP)  ## create .venv and install the project, vLLM and test tools (a no-op when done)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) $(PYTHON)
	touch $@

demo: install  ## run the pipeline on the bundled synthetic demo dataset
	$(PY) -m pipeline demo $(ARGS)

test: install  ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q $(ARGS)

lint: install  ## ruff over the code
	$(VENV)/bin/ruff check .

videoqa: install  ## answer a dataset's questions: make videoqa DATASET=egoschema CAPTIONER=mmser
	$(PY) -m pipeline videoqa --dataset $(DATASET) --captioner $(CAPTIONER) $(ARGS)

serve-reader: install  ## start the reader's vLLM server by hand (reader.* keys in config.yaml)
	$(PY) -m pipeline serve-reader $(ARGS)

train: install  ## train one MM-SeR stage: make train ARGS="--stage align --set train.data.train=[...]"
	$(PY) -m pipeline train $(ARGS)

bench-decode: install  ## decord sampling speed, Ray vs serial, memory per worker
	$(PY) -m benchmarks.decode $(ARGS)

bench-captioner: install  ## simple vs MM-SeR frames/s at real sizes (random weights)
	$(PY) -m benchmarks.captioner $(ARGS)

bench-reader: install  ## reader questions/s at concurrency 1 vs 8 (tiny CPU vLLM server)
	$(PY) -m benchmarks.reader $(ARGS)

bench-pipeline: install  ## cold vs warm cache, decode/caption overlap
	$(PY) -m benchmarks.pipeline $(ARGS)

bench-cluster: install  ## the same videos on a 2-node local Ray cluster and on one node
	$(PY) -m benchmarks.cluster $(ARGS)

RUNS ?= $(wildcard runs/*)
compare: install  ## one table from several runs: make compare RUNS="runs/a runs/b"
	$(PY) -m pipeline compare $(RUNS)

report: install  ## rebuild a run folder's HTML report (frames, captions, answers): make report RUN=runs/x
	$(PY) -m pipeline report $(RUN)

bench-captioners: install  ## all four captioners timed on the same frames (make bench-captioners ARGS="--device cuda")
	$(PY) -m benchmarks.captioner_comparison $(ARGS)

bench-learn: install  ## does refinement learn to correct by looking? 3 seeds on the synthetic world (~30 min)
	$(PY) -m benchmarks.learn $(ARGS)

bench-captioning: install  ## caption-quality table (BLEU, ROUGE-L, CIDEr, METEOR, BERTScore) on the synthetic world
	$(PY) -m benchmarks.captioning $(ARGS)

data: install  ## import EgoSchema: make data DATASET=egoschema SRC=path/to/copy (ARGS=--remove-zips)
	$(PY) -m pipeline data $(DATASET) --from $(SRC) $(ARGS)

eval-captions: install  ## score a captioner on a test split: make eval-captions ARGS='--data F --format coco --split test'
	$(PY) -m pipeline eval-captions $(ARGS)

clean:  ## remove generated data, runs and results (keeps .venv)
	rm -rf data runs benchmarks/results .cache
