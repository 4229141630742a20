# The two set-up commands of the README:
#   make demo   installs, starts the four services, solves a sample problem through them, stops them
#   make test   installs and runs the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
export RSTAR_HOME ?= $(HOME)/.rstar

.PHONY: setup demo test test-fast bench protos clean

setup:
	./scripts/setup.sh

demo: setup
	$(PY) -m rstar_cli demo $(if $(MODEL),--model $(MODEL))

test: setup
	./scripts/test.sh

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not e2e"

bench: setup
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

protos: setup
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/rstar/v1/*.proto

clean:
	rm -rf $(VENV) .pytest_cache
