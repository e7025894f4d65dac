# The two commands of the README: `make run` and `make test`.
# Both build the virtualenv on first use (and reinstall when the sources change).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVER_NAME ?= localhost:8448
DATA_DIR ?= devicelist-data
CONFIG ?= $(DATA_DIR)/devicelist.yaml
TRIAL_ARGS ?= tests

SOURCES := setup.cfg pyproject.toml $(shell find devicelist_plugin twisted -name '*.py' -o -name '*.sql')

.PHONY: run test interop typecheck clean

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '.[postgres,test,dev]'
	touch $@

# The first run writes a configuration (and signing key, self-signed TLS
# certificate, registration secret) into DATA_DIR; later runs reuse it.
run: $(VENV)/.installed
	test -f $(CONFIG) || $(BIN)/python -m devicelist_plugin generate-config --server-name $(SERVER_NAME) --data-dir $(DATA_DIR)
	$(BIN)/twistd -n --pidfile= devicelist --config $(CONFIG)

test: $(VENV)/.installed
	PYTHONPATH=. $(BIN)/trial $(TRIAL_ARGS)

# Our server next to a real Synapse (scenarios in interop/); Synapse is
# installed on first use into its own cached virtualenv outside the repository
# (${XDG_CACHE_HOME:-~/.cache}/devicelist-plugin/, or $DEVICELIST_SYNAPSE_VENV).
interop: $(VENV)/.installed
	PYTHONPATH=. $(BIN)/trial interop

typecheck: $(VENV)/.installed
	$(BIN)/mypy
	$(BIN)/ruff check --select F devicelist_plugin tests twisted bench examples interop

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* .mypy_cache .hypothesis
