# One command each: `make app` sets up and starts the app; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup app test test-fast

setup:
	bash scripts/setup.sh

app: setup
	$(PY) app.py

test:
	bash scripts/setup.sh --browser
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not integration and not browser"
