# One command each: `make demo`, `make test` and `make lint` create/refresh the venv, install, then run.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
ML := $(VENV)/bin/marrowlens
STAMP := $(VENV)/.installed
DEMO ?= demo
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint clean-demo browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# the linters first (`lint`), so CI (`.ci/run`: `make test`) runs them too
test: install browser lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install browser lint
	$(PY) -m pytest -q -m '' $(PYTEST_ARGS)

# ruff (lint + format, 120 columns) and mypy (strict), configured in pyproject.toml; the venv's own
# versions (the `test` extra), so every machine lints alike.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: install
	$(PY) -m marrowlens.demo --out $(DEMO)

clean-demo:
	rm -rf $(DEMO)

# Debian's Chromium for the retrieval page's browser test (Playwright drives it; no browser is ever
# downloaded). Fails softly: without root or apt the browser test is skipped with its reason.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
		|| echo "note: Chromium not installed at $(CHROMIUM); the browser test will be skipped"
