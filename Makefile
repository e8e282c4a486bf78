# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch pair these machines install from local wheels; override for another build, e.g.
# make demo TORCH='torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126'
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml $(PLUGINS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]" $(addprefix -e ,$(dir $(PLUGINS)))
	touch $(STAMP)

## run the embedded default study: search, retrain the best, export it, show the leaderboard
demo: $(STAMP)
	$(BIN)/automl-tl search studies/digits.toml
	$(BIN)/automl-tl report studies/digits.toml

## run the whole test suite (installs everything first)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## the suite without the tests marked slow (a few minutes): for development; CI runs them all
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=10 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) studies/digits
