# cxr-dwml: `make demo` runs the whole pipeline on the embedded demo data; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
# DVC and Airflow spawn `python`/`dvc`/`airflow` subprocesses: the venv must come first on PATH
export PATH := $(BIN):$(PATH)

.PHONY: demo test venv repro summary paper params dag-test stack-test lint clean help kfp-venv kfp-lock kfp-compile kfp-test

help:
	@echo "make demo      run the whole pipeline on the demo data (creates .venv first if missing)"
	@echo "make test      run the test suite"
	@echo "make lint      ruff check and ruff format --check (what CI runs before the tests)"
	@echo "make paper     run the paper profile (NIH data, ConvNeXt-T, BioBERT; needs data and a GPU)"
	@echo "make params    compose params.yaml from conf/ (PROFILE=paper, SET='train.epochs=2 ...')"
	@echo "make dag-test  run the Airflow DAG once with 'airflow dags test' in a throwaway AIRFLOW_HOME"
	@echo "make stack-test  the compose stack as local processes, end to end (needs PostgreSQL on 127.0.0.1:5432)"
	@echo "make kfp-compile the Kubeflow Pipelines v2 pipeline as IR YAML (KFP_OUT=path, KFP_IMAGE=image)"
	@echo "make kfp-test  run the KFP pipeline end to end with kfp.local on the tiny demo (.venv-kfp)"

# The development venv: the pipeline plus the extras the tests exercise (Airflow for the DAG,
# the PostgreSQL drivers, DICOM reading, the test tools and ruff); see pyproject.toml for each extra.
EXTRAS := dev,airflow,postgres,dicom

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# The Kubeflow Pipelines environment: the pipeline plus the `kfp` extra. kfp 2.17.3 needs
# kubernetes < 31 and protobuf < 7, the `airflow` extra kubernetes 36: they cannot share a venv.
KFP_VENV ?= .venv-kfp
KFP_BIN := $(CURDIR)/$(KFP_VENV)/bin
KFP_LOCK := requirements-kfp.lock

$(KFP_VENV)/.installed: pyproject.toml $(KFP_LOCK)
	test -x $(KFP_BIN)/python || $(PYTHON) -m venv $(KFP_VENV)
	$(KFP_BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(KFP_BIN)/python -m pip install --quiet -c $(KFP_LOCK) -e ".[kfp]"
	touch $@

kfp-venv: $(KFP_VENV)/.installed

# Rewrites requirements-kfp.lock: core + kfp resolved in a throwaway venv against requirements.lock,
# less the pins kfp cannot take, so both environments share every other version.
KFP_UNPINNED := kubernetes kubernetes_asyncio protobuf requests
kfp-lock:
	rm -rf build/kfp-lock && $(PYTHON) -m venv build/kfp-lock
	build/kfp-lock/bin/python -m pip install --quiet --upgrade "pip>=24"
	grep -vE '^($(subst $(eval) ,|,$(KFP_UNPINNED)))==' requirements.lock > build/kfp-constraints.txt
	build/kfp-lock/bin/python -m pip install --quiet -c build/kfp-constraints.txt -e ".[kfp]"
	{ echo "# Every package of the KFP environment (.venv-kfp: the core and the kfp extra), from a real resolve:"; \
	  echo "# requirements.lock's pins less those kfp 2.17.3 cannot take ($(KFP_UNPINNED)); make kfp-lock."; \
	  build/kfp-lock/bin/python -m pip freeze --all --exclude-editable | grep -vE '^(cxr-dwml|pip)=='; } > $(KFP_LOCK)
	rm -rf build/kfp-lock build/kfp-constraints.txt

# The pipeline's IR YAML, for the KFP UI or `kfp pipeline create`; KFP_IMAGE: the steps' image
KFP_OUT ?= build/cxr_dwml.yaml
KFP_IMAGE ?=
kfp-compile: kfp-venv
	$(KFP_BIN)/python kubeflow/cxr_dwml.py compile --out $(KFP_OUT) $(if $(KFP_IMAGE),--image $(KFP_IMAGE))

# tests/test_kubeflow.py runs under the main venv and starts .venv-kfp's Python
kfp-test: venv kfp-venv
	$(BIN)/python -m pytest -q tests/test_kubeflow.py

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

# pytest-xdist workers; each module runs whole on one worker, the longest first (tests/conftest.py);
# TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= 3

# The stack test (tests/test_stack.py, several minutes) runs in `make test` under CI=true only;
# `make stack-test` runs it alone.
STACK_FILTER := $(if $(filter true,$(CI)),,-m "not stack")

# Under CI=true the suite includes the KFP tests, which need .venv-kfp (elsewhere they skip without it).
test: venv $(if $(filter true,$(CI)),kfp-venv)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 $(STACK_FILTER)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

dag-test: venv
	$(BIN)/python -m pytest -q tests/test_dag.py -k dags_test

stack-test: venv
	$(BIN)/python -m pytest -q tests/test_stack.py

clean:
	rm -rf data artifacts reports mlflow.db mlartifacts kfp-outputs
