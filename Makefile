# The two commands of the README: `make quickstart` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart test test-fast install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,quickstart]'
	touch $(STAMP)

install: $(STAMP)

## Fine-tune all-MiniLM-L6-v2 on WordNet pairs, offline; prints held-out nDCG@10 before and after.
quickstart: $(STAMP)
	$(VENV)/bin/embedtrain train recipes/minilm/wordnet_quickstart.yaml --overwrite

## The whole test suite, slow end-to-end tests included.
test: $(STAMP)
	$(PY) -m pytest -q

## Everything but the slow end-to-end tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
