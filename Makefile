# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use with the pinned CPU build of torch (a plain `torch`
# requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JOBS ?= 2

.PHONY: demo test lint bench bench-quick clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,hf,lightning]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m morphc demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(JOBS) --durations=15

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.installed
	$(BIN)/python -m morphc bench

bench-quick: $(BIN)/.installed
	$(BIN)/python -m morphc bench --quick

clean:
	rm -rf $(VENV) build *.egg-info demo-results bench-results
