# cxr-dwml: `make demo` runs the whole pipeline on the embedded demo data; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
# DVC and Airflow spawn `python`/`dvc`/`airflow` subprocesses: the venv must come first on PATH
export PATH := $(BIN):$(PATH)

.PHONY: demo test venv repro summary paper params dag-test stack-test lint clean help

help:
	@echo "make demo      run the whole pipeline on the demo data (creates .venv first if missing)"
	@echo "make test      run the test suite"
	@echo "make lint      ruff check and ruff format --check (what CI runs before the tests)"
	@echo "make paper     run the paper profile (NIH data, ConvNeXt-T, BioBERT; needs data and a GPU)"
	@echo "make params    compose params.yaml from conf/ (PROFILE=paper, SET='train.epochs=2 ...')"
	@echo "make dag-test  run the Airflow DAG once with 'airflow dags test' in a throwaway AIRFLOW_HOME"
	@echo "make stack-test  the compose stack as local processes, end to end (needs PostgreSQL on 127.0.0.1:5432)"

# The development venv: the pipeline plus the extras the tests exercise (Airflow for the DAG,
# the PostgreSQL drivers, DICOM reading, the test tools and ruff); see pyproject.toml for each extra.
EXTRAS := dev,airflow,postgres,dicom

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# `dvc checkout --relink`: outputs a run under an older cache.type left as copies become links too
demo: venv
	$(BIN)/dvc repro
	$(BIN)/dvc checkout --relink
	$(BIN)/python -m components.summary

paper: venv
	$(BIN)/dvc exp run -S profile=paper

# params.yaml from conf/ for `dvc repro` (`dvc exp run` composes it itself)
PROFILE ?=
SET ?=
params: venv
	$(BIN)/python -m components.params $(if $(PROFILE),--profile $(PROFILE)) $(foreach s,$(SET),--set $(s))

# The stack test (tests/test_stack.py, several minutes) runs in `make test` under CI=true only;
# `make stack-test` runs it alone.
# pytest-xdist workers; each module runs whole on one worker, the longest first (tests/conftest.py);
# TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= 3
STACK_FILTER := $(if $(filter true,$(CI)),,-m "not stack")

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 $(STACK_FILTER)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

dag-test: venv
	$(BIN)/python -m pytest -q tests/test_dag.py -k dags_test

stack-test: venv
	$(BIN)/python -m pytest -q tests/test_stack.py

clean:
	rm -rf data artifacts reports mlflow.db mlartifacts
