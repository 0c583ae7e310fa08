# The two commands a user needs: `make serve` and `make test`.
# Each creates .venv and installs what it needs (torch CPU build first, so that
# no other package can pull a CUDA torch onto a CPU machine).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: serve test install lint proto bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/superbrain serve $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check serving tests
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check serving tests
	$(PY) -m ruff format --check serving tests

proto: $(STAMP)
	$(PY) -m serving.protogen

bench: $(STAMP)
	$(VENV)/bin/superbrain bench --workload W1 --compare $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
