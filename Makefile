# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv/ at the repo root when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PACKAGES := packages/core packages/trainer packages/evaluator services/api services/worker
STAMP := $(VENV)/.lyco-installed

.PHONY: venv test demo demo-core lint bench clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel for development and CI (GPU images install CUDA builds)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q $(foreach p,$(PACKAGES),-e $(p))
	touch $(STAMP)

test: venv
	$(VENV)/bin/ruff check packages services tests bench examples
	$(VENV)/bin/mypy packages/core/src/lyco_core
	$(PY) -m pytest -q

demo: venv
	$(PY) examples/train_demo.py --out demo-out

demo-core: venv
	$(PY) examples/core_demo.py --out demo-out/core

bench: venv
	$(PY) bench/train_step.py

lint: venv
	$(VENV)/bin/ruff check packages services tests bench examples

clean:
	rm -rf $(VENV) demo-out .pytest_cache
