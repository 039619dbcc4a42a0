# The two commands: `make run` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= authgateway-data
BIN := $(VENV)/bin

.PHONY: run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Loopback listeners, a self-signed certificate and a demo user under $(DATA_DIR).
run: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m gateway.demo $(DATA_DIR)
	$(BIN)/twistd --pidfile= -n authgateway --data-dir $(DATA_DIR) \
		--auth htpasswd:$(DATA_DIR)/users.htpasswd

test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/trial tests

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp twisted/plugins/dropin.cache
