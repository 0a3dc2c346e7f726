# `make test` and `make demo` work on a machine with only Python and PyPI.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
MODERN := $(VENV)/modern
LEGACY := $(VENV)/legacy
LOWEST := $(VENV)/lowest
PYTEST_ARGS ?=

.PHONY: test test-modern test-legacy test-lowest lint graph docs demo bench clean browser

# The latest versions (modern), pymacaron's (legacy), the lowest setup.py allows (lowest).
test: lint test-modern test-legacy test-lowest docs

$(MODERN)/.installed: setup.py requirements/modern.txt
	$(PYTHON) -m venv $(MODERN)
	$(MODERN)/bin/pip install -q --upgrade pip
	$(MODERN)/bin/pip install -q -r requirements/modern.txt -e .
	touch $@

$(LEGACY)/.installed: setup.py requirements/legacy.txt
	$(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/pip install -q -r requirements/legacy.txt -e .
	touch $@

$(LOWEST)/.installed: setup.py requirements/lowest.txt
	$(PYTHON) -m venv $(LOWEST)
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
