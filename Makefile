# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv when pyproject.toml or constraints.txt changed.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mmcl-installed
# open_clip's own trainer needs webdataset<=0.2.86 (open_clip #935); it lives in its own folder and is put
# first on PYTHONPATH only for processes that run open_clip's trainer (interop tests, benchmarks).
WDS_OLD := $(VENV)/wds-0.2.86
# Debian packages for the real demo data and audio fixtures (../shared/DATASETS.md).
DEBS := espeak-ng dataset-fashion-mnist

.PHONY: demo test lint sysdeps install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, exactly as measured in ENVIRONMENT.md: torchaudio 2.9 resolves only against torch 2.9.1.
	$(PIP) install -c constraints.txt torch torchvision
	$(PIP) install -c constraints.txt torch torchaudio
	$(PIP) install -c constraints.txt -e '.[dev,ray,hf]'
	$(PIP) install --no-deps --upgrade --target $(WDS_OLD) webdataset==0.2.86
	touch $(STAMP)

sysdeps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi; \
	fi

# Test processes (pytest-xdist): most tests wait on subprocesses that import torch, so two share two cores
# well; `make test TEST_PROCESSES=1` runs them one at a time.
TEST_PROCESSES ?= 2

test: $(STAMP) sysdeps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_PROCESSES) tests

LINT_PATHS := mmcl shards_tools pipelines tests bench

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

demo: $(STAMP) sysdeps
	HF_HUB_OFFLINE=1 $(VENV)/bin/mmcl demo

clean:
	rm -rf $(VENV) demo_out
