# splitdet — `make test` and `make demo` work on a fresh clone with only Python installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint fmt demo proto lock clean

# constraints.txt holds the versions the suite passed with, so a clean clone installs those and
# not whatever the registry published since (a newer tool once failed CI with nothing changed).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[full,test]"
	touch $(STAMP)

# Four workers on 2 cores (the suite waits on processes and sockets as much as it computes),
# a test module each at a time (its fixtures are made once), the slowest modules first
# (tests/conftest.py SLOW_MODULES; xdist's own order, most tests first, left an 80 s module to
# the end). Four at first failed CI runs on timing: each was a fault found and mended (two test
# races, a training run that lost SIGTERM inside a finaliser); three workers took ~15 minutes.
# The 25 slowest tests are listed at the end, to keep the suite's time in view.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 4 --dist loadfile --no-loadscope-reorder --durations=25

# The whole system on built-in defaults; data, the trained model and the export are cached in
# .cache/demo, so a second run takes minutes.
demo: $(STAMP)
	$(PY) -m splitdet.shared.cli demo --workdir .cache/demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

fmt: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Regenerate shared/wire/ (protobuf + gRPC code) from proto/; tests fail while it is stale.
proto: $(STAMP)
	$(PY) proto/generate.py

# After upgrading a dependency in the venv and passing `make test`: record the new set.
lock: $(STAMP)
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
