# One command each: `make demo` and `make test` create/refresh the venv, install, then run.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
ML := $(VENV)/bin/marrowlens
STAMP := $(VENV)/.installed
DEMO ?= demo
PYTEST_ARGS ?=

.PHONY: install demo test test-all clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m '' $(PYTEST_ARGS)

demo: install
	$(PY) -m marrowlens.demo --out $(DEMO)

clean-demo:
	rm -rf $(DEMO)
