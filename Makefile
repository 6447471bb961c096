# Two entry points: `make demo` and `make test`. Each creates .venv on first
# use and installs tiermem (editable) with its test extras into it.
VENV ?= .venv
PYTHON ?= python3
export RAY_USAGE_STATS_ENABLED = 0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/tiermem demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest
