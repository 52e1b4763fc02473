# `make quickstart` runs the quickstart study; `make test` runs the test suite.
# Both create the virtualenv .venv on first use (idempotent).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
# This machine's pip configuration names index folders that may be absent; drop those warnings.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install quickstart test test-fast tools clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0 -c requirements.lock 2>&1 | { $(QUIET_PIP); }
	$(VENV)/bin/pip install -q --disable-pip-version-check -c requirements.lock -e '.[test]' 2>&1 | { $(QUIET_PIP); }
	touch $(STAMP)

install: $(STAMP)

tools:
	bash scripts/install-tools.sh

quickstart: install
	$(VENV)/bin/wxscale run examples/quickstart.yaml --output runs/quickstart

test: install tools
	bash scripts/system-tools.sh
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(VENV)/bin/pytest -q

test-fast: install tools
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .tools runs
