# Quick start: `make run` (a tuning study on this machine's CPU), `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
SPACE ?= search_spaces/quickstart-cpu.yaml

.PHONY: setup system-deps run test validate clean

setup: $(VENV)/.installed

# torch first, pinned: it installs the CPU build from this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: setup
	$(VENV)/bin/autotune run $(SPACE)

validate: setup
	$(VENV)/bin/autotune validate $(SPACE)

# The whole suite, the browser and database tests included: tests/system_deps.sh installs Debian's
# chromium, chromium-driver and postgresql when missing (as root or with sudo), or stops with the
# one command to run. Two workers share the machine (much of a study's time is waiting on
# processes to start); the tests that assert wall-clock bounds (marked `alone`) run after them,
# with nothing beside them. Both parts always run; the exit code is the first failure's.
WORKERS ?= 2
test: setup system-deps
	@first=0; second=0; \
	$(PY) -m pytest -n $(WORKERS) --dist loadscope -m "not alone" || first=$$?; \
	$(PY) -m pytest -m alone || second=$$?; \
	if [ $$first -ne 0 ]; then exit $$first; fi; exit $$second

system-deps:
	@bash tests/system_deps.sh

clean:
	rm -rf $(VENV) .pytest_cache mlflow.db mlruns autotune-runs
