# Two commands for a fresh machine: `make demo` runs labbus, `make test` runs the test suite.
# Both create the virtualenv, install the Python packages and start the local services first.
PYTHON ?= python3
VENV := .venv
LABBUS := $(VENV)/bin/labbus
# schemathesis (the API contract test) needs jsonschema>=4.18, which opentrons (jsonschema<4.18)
# keeps out of the main virtualenv: it gets one of its own, used through its `st` command.
ST_VENV := .venv-schemathesis

.PHONY: setup services demo test bench bench-testing bench-stages bench-anomaly bench-faust-patches bench-convergence bench-query bench-gateway bench-commands protos sila down lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

$(ST_VENV)/.installed: tests/schemathesis-requirements.txt
	$(PYTHON) -m venv $(ST_VENV)
	$(ST_VENV)/bin/pip install -q --upgrade pip
	$(ST_VENV)/bin/pip install -q -r tests/schemathesis-requirements.txt
	touch $@

setup: $(VENV)/.installed $(ST_VENV)/.installed services

services: $(VENV)/.installed
	$(LABBUS) services up

demo: setup
	$(LABBUS) demo

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=25

bench: setup
	$(VENV)/bin/python tests/bench/bench_pipeline.py
	$(VENV)/bin/python tests/bench/bench_pipeline.py --validators 2

# issue 11: 100 service requests x 3 protocols to the PDF downloadable from the query API,
# with one renderer process, then rendering in the report worker's event loop (the baseline)
bench-testing: setup
	$(VENV)/bin/python tests/bench/bench_testing.py --requests 100 --renderers 1,0

bench-stages: setup
	$(VENV)/bin/python tests/bench/bench_stages.py

bench-anomaly: setup
	$(VENV)/bin/python tests/bench/bench_anomaly.py

bench-faust-patches: setup
	$(VENV)/bin/python tests/bench/bench_faust_patches.py

bench-query: setup
	$(VENV)/bin/python tests/bench/bench_query.py

bench-convergence: $(VENV)/.installed
	$(VENV)/bin/python tests/bench/bench_convergence.py

bench-gateway: setup
	$(VENV)/bin/python tests/bench/bench_gateway.py --devices 1000 --rate 5

bench-commands: setup
	$(VENV)/bin/python tests/bench/bench_commands.py --devices 1000 --commands-per-s 200
	$(VENV)/bin/python tests/bench/bench_commands.py --devices 1000 --commands-per-s 200 --path kafka

# regenerate the gateway's checked-in stubs from producers/gateway/labbus_gateway.proto
protos: $(VENV)/.installed
	$(VENV)/bin/python -m labbus.producers.gateway.protos

# the SiLA 2 simulator's feature code, from its Feature Definition
sila: $(VENV)/.installed
	$(VENV)/bin/sila2-codegen generate-feature-files --overwrite -o producers/sila/generated producers/sila/Thermostat.sila.xml

down:
	$(LABBUS) services down

lint: $(VENV)/.installed
	$(VENV)/bin/pip install -q ruff
	$(VENV)/bin/ruff check events producers processors projections api deploy tests
