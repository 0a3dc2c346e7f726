# `make test` and `make demo` work on a machine with only Python and PyPI.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# Each environment on the Python it is tested on when the machine has it (on PATH, or pyenv's),
# else $(PYTHON): modern on the newest Python setup.py claims (3.13), legacy on pymacaron's
# (3.11, $(PYTHON)), lowest on the oldest claimed (3.9).
python_for = $(or $(shell for p in python$(1) "$$(pyenv prefix $(1) 2>/dev/null)/bin/python$(1)"; do \
  "$$p" -c "import sys" >/dev/null 2>&1 && command -v "$$p" && break; done),$(PYTHON))
PYTHON_MODERN ?= $(call python_for,3.13)
PYTHON_LOWEST ?= $(call python_for,3.9)
VENV := .venv
MODERN := $(VENV)/modern
LEGACY := $(VENV)/legacy
LOWEST := $(VENV)/lowest
PYTEST_ARGS ?=

.PHONY: test test-modern test-legacy test-lowest lint graph docs demo bench clean browser conformance conformance-ci

# The latest versions (modern), pymacaron's (legacy), the lowest setup.py allows (lowest).
test: lint test-modern conformance-ci test-legacy test-lowest docs

$(MODERN)/.installed: setup.py requirements/modern.txt
	$(PYTHON_MODERN) -m venv $(MODERN)
	$(MODERN)/bin/pip install -q --upgrade pip
	$(MODERN)/bin/pip install -q -r requirements/modern.txt -e .
	touch $@

$(LEGACY)/.installed: setup.py requirements/legacy.txt
	$(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/pip install -q -r requirements/legacy.txt -e .
	touch $@

$(LOWEST)/.installed: setup.py requirements/lowest.txt
	$(PYTHON_LOWEST) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q -r requirements/lowest.txt -e .
	touch $@

lint: $(MODERN)/.installed
	$(MODERN)/bin/ruff check .
	$(MODERN)/bin/ruff format --check .
	$(MODERN)/bin/lint-imports
	$(MODERN)/bin/mypy

# The import graph of both packages, module by module.
graph: $(MODERN)/.installed
	$(MODERN)/bin/python -m tests.graph

test-modern: $(MODERN)/.installed browser
	$(MODERN)/bin/python -m pytest $(PYTEST_ARGS)

# Celery's own integration suite (t/integration of the installed Celery's sdist, fetched once into
# .venv/conformance/) on raw Celery and on the extension's app, side by side: tests/conformance/run.py.
# `make conformance` runs all of test_tasks.py and test_canvas.py on both (~40 min);
# conformance-ci (in `make test`) the extension's side of a selection, against the known failures of raw Celery.
CONFORMANCE_ARGS ?=

$(MODERN)/.conformance: $(MODERN)/.installed requirements/conformance.txt
	$(MODERN)/bin/pip install -q -r requirements/conformance.txt
	touch $@

conformance: $(MODERN)/.conformance
	$(MODERN)/bin/python -m tests.conformance.run --both $(CONFORMANCE_ARGS)

conformance-ci: $(MODERN)/.conformance
	$(MODERN)/bin/python -m tests.conformance.run --ci $(CONFORMANCE_ARGS)

# The dashboard's browser test drives Debian's headless Chromium (with Selenium): installed
# when missing, as root with apt-get. Never fails the build: the test then skips, saying why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	    >/tmp/pma-browser-install.log 2>&1 \
	    || echo "make browser: installing chromium failed (/tmp/pma-browser-install.log): the browser test will skip"; \
	else echo "make browser: no chromium, and not root with apt-get: the browser test will skip"; fi

# Old Celery/kombu raise deprecation warnings of their own on Python 3.11.
test-legacy: $(LEGACY)/.installed
	$(LEGACY)/bin/python -m pytest -W "ignore::DeprecationWarning" -W "ignore::PendingDeprecationWarning" $(PYTEST_ARGS)

# The core suite (not the fault and soak tests, run on near-lowest versions by test-legacy) on the lowest versions.
test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -m pytest -m "not slow" -W "ignore::DeprecationWarning" -W "ignore::PendingDeprecationWarning" $(PYTEST_ARGS)

docs: $(MODERN)/.installed
	$(MODERN)/bin/sphinx-build -W -q -b html docs docs/_build/html

demo: $(MODERN)/.installed
	$(MODERN)/bin/python examples/run_demo.py

bench: $(MODERN)/.installed
	$(MODERN)/bin/pip install -q flask-celeryext rq "dramatiq[redis]" huey
	$(MODERN)/bin/python benchmarks/run.py

clean:
	rm -rf $(VENV) docs/_build build dist *.egg-info
