# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv when missing and install the pinned requirements once per requirements hash.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell cat requirements.txt settings.ini setup.py | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test test-slow test-gpu ablations lab docs export clean synth-data grid bench

setup: $(STAMP)

$(STAMP): requirements.txt settings.ini setup.py
	@echo "== setting up $(VENV) (requirements hash $(REQ_HASH))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name hrda --display-name "Python (hrda)" >/dev/null
	@if [ -d .git ]; then $(BIN)/nbdev_install_hooks >/dev/null 2>&1 || echo "note: nbdev git hooks not installed"; fi
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "== $(VENV) is ready"

demo: setup
	$(BIN)/hrda demo $(if $(SEEDS),--seeds $(SEEDS))

synth-data: setup
	$(BIN)/python data_prep/make_synth.py data/synth

bench: setup
	$(BIN)/python benchmarks/bench_train_step.py $(ARGS)

grid: setup
	$(BIN)/python experiments/run_grid.py $(EXP) $(if $(SEEDS),--seeds $(SEEDS)) $(ARGS)

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# The tests marked slow (MiT-B5 training steps on the CPU: minutes), alone.
test-slow: setup
	$(BIN)/python -m pytest tests -m slow --run-slow $(PYTEST_ARGS)

# The checks that need one CUDA GPU: the CUDA-graph step against the eager step, then the paper-setting benchmark
# and `hrda train` with both step modes, into reports/perf/graph/ (benchmarks/gpu_checks.sh).
test-gpu: setup
	PYTHON=$(BIN)/python bash benchmarks/gpu_checks.sh

ablations: setup
	$(BIN)/hrda ablations $(ARGS)

# JUPYTER_PATH first: this clone's `hrda` kernel (in .venv) wins over one another clone installed for the user
lab: setup
	JUPYTER_PATH=$(abspath $(VENV))/share/jupyter $(BIN)/jupyter lab --notebook-dir nbs $(if $(filter 0,$(shell id -u)),--allow-root)

export: setup
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	$(BIN)/python -c "from hrda.devtools import write_readme; write_readme()"

docs: setup
	$(BIN)/python -c "from hrda.devtools import build_docs; print('docs in', build_docs())"

clean:
	rm -rf _docs _proc .pytest_cache reports/_smoke
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
