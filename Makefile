# `make test` and `make demo` work on a machine with only Python and PyPI.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
MODERN := $(VENV)/modern
LEGACY := $(VENV)/legacy
PYTEST_ARGS ?=

.PHONY: test test-modern test-legacy lint docs demo bench clean

test: lint test-modern test-legacy docs

$(MODERN)/.installed: setup.py requirements/modern.txt
	$(PYTHON) -m venv $(MODERN)
	$(MODERN)/bin/pip install -q --upgrade pip
	$(MODERN)/bin/pip install -q -r requirements/modern.txt -e .
	touch $@

$(LEGACY)/.installed: setup.py requirements/legacy.txt
	$(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/pip install -q -r requirements/legacy.txt -e .
	touch $@

lint: $(MODERN)/.installed
	$(MODERN)/bin/ruff check .
	$(MODERN)/bin/ruff format --check .

test-modern: $(MODERN)/.installed
	$(MODERN)/bin/python -m pytest $(PYTEST_ARGS)

# Old Celery/kombu raise deprecation warnings of their own on Python 3.11.
test-legacy: $(LEGACY)/.installed
	$(LEGACY)/bin/python -m pytest -W "ignore::DeprecationWarning" -W "ignore::PendingDeprecationWarning" $(PYTEST_ARGS)

docs: $(MODERN)/.installed
	$(MODERN)/bin/sphinx-build -W -q -b html docs docs/_build/html

demo: $(MODERN)/.installed
	$(MODERN)/bin/python examples/run_demo.py

bench: $(MODERN)/.installed
	$(MODERN)/bin/pip install -q flask-celeryext rq dramatiq
	$(MODERN)/bin/python benchmarks/run.py

clean:
	rm -rf $(VENV) docs/_build build dist *.egg-info
