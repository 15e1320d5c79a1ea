# `make run` starts the backend, `make test` runs the tests; both set up .venv first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test test-fast test-env lint docs bench quality quality-labels quality-labels-tasks quality-exemplars quality-clip audit clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml scripts/install.sh
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	PIP="$(VENV)/bin/python -m pip" scripts/install.sh --dev
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fastsam-backend serve

# What tests/real_ls needs besides .venv: Label Studio in .venv-ls, moto's S3 server in .venv-moto, Chromium + chromedriver, selenium.
test-env: $(STAMP)
	PY=$(PY) PROJECT_PY=$(VENV)/bin/python scripts/install_test_env.sh

test: $(STAMP) test-env
	$(VENV)/bin/python -m pytest

# The inner loop: everything but the tests that load a real model, drive a real Label Studio or
# wait out seconds of timeouts (no torch import; two pytest-xdist workers, one per core; the time
# on a 2-core machine is in docs/development.md; bytecode is cached even where the environment says
# PYTHONDONTWRITEBYTECODE, or every run compiles every module again). `make test` stays the whole suite.
test-fast: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(VENV)/bin/python -m pytest -m "not model and not real_ls and not slow" -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The docs site (docs/, mkdocs.yml) into site/; --strict: a broken link or anchor fails.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

# The quality table of docs/quality.md: the shipped fixtures unless FASTSAM_WEIGHTS etc. are set.
QUALITY_ENV = FASTSAM_WEIGHTS=$${FASTSAM_WEIGHTS:-tests/fixtures/models/fastsam-shapes.pt} IMGSZ=$${IMGSZ:-640} \
	CONF=$${CONF:-0.1} IOU=$${IOU:-0.7} FASTSAM_ALLOW_DOWNLOAD=false \
	OPEN_CLIP_MODEL=$${OPEN_CLIP_MODEL:-tests/fixtures/models/clip-shapes.json} \
	OPEN_CLIP_PRETRAINED=$${OPEN_CLIP_PRETRAINED:-tests/fixtures/models/clip-shapes.pt}
quality: $(STAMP)
	$(QUALITY_ENV) $(VENV)/bin/fastsam-backend quality $(QUALITY_ARGS)

# The learned-labels tables of docs/learned-labels.md (LABELS_ARGS=--dev: the development scenes):
# by examples per label, and (quality-labels-tasks) by annotated tasks
quality-labels: $(STAMP)
	$(QUALITY_ENV) $(VENV)/bin/fastsam-backend quality-labels $(LABELS_ARGS)

quality-labels-tasks: $(STAMP)
	$(QUALITY_ENV) $(VENV)/bin/fastsam-backend quality-labels --tasks $(LABELS_ARGS)

# CLIP alone on ground-truth masks, the configured CLIP and each approximation (docs/weights.md)
quality-clip: $(STAMP)
	$(QUALITY_ENV) $(VENV)/bin/fastsam-backend quality-clip $(CLIP_ARGS)

# The exemplar-prompt table of docs/exemplars.md (EXEMPLAR_ARGS=--dev: the development scenes; --no-clip)
quality-exemplars: $(STAMP)
	$(QUALITY_ENV) $(VENV)/bin/fastsam-backend quality-exemplars $(EXEMPLAR_ARGS)

# pip-audit of the pinned requirements.txt; skipped (saying why) where no vulnerability service answers
audit: $(STAMP)
	$(VENV)/bin/python scripts/audit_requirements.py

clean:
	rm -rf $(VENV) .venv-ls .venv-moto .pytest_cache .ruff_cache site
