# `make run` starts the backend, `make test` runs the tests; both set up .venv first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint bench quality clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml scripts/install.sh
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	PIP="$(VENV)/bin/python -m pip" scripts/install.sh --dev
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fastsam-backend serve

test: $(STAMP)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/fastsam-backend bench $(BENCH_ARGS)

quality: $(STAMP)
	$(VENV)/bin/fastsam-backend quality

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
