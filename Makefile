# The two commands a user needs: `make serve` and `make test`.
# Each creates .venv and installs what it needs (torch CPU build first, so that
# no other package can pull a CUDA torch onto a CPU machine).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
ARGS ?=
# make loadtest / make capacity (loadtest/, docs/capacity.md)
ROBOTS ?= 50
RATE_HZ ?= 10
DURATION ?= 60s
TARGET ?= 127.0.0.1:9000
REPLICAS ?= 1
STEP_DURATION ?= 30s

.PHONY: serve test install lint proto bench loadtest capacity clean

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

loadtest: $(STAMP)
	$(PY) -m loadtest.run --robots $(ROBOTS) --rate-hz $(RATE_HZ) --duration $(DURATION) --target $(TARGET) $(ARGS)

capacity: $(STAMP)
	$(PY) -m loadtest.capacity --replicas $(REPLICAS) --rate-hz $(RATE_HZ) --step-duration $(STEP_DURATION) $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
