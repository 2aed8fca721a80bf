# depthkit: `make demo` and `make test` each work alone on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.depthkit-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=
FRESH ?= 0

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml constraints.txt depthkit/__init__.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# A venv without pip (its creation stopped half way: Debian without python3-venv) gets pip, or a clear message.
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --upgrade >/dev/null 2>&1 || \
		{ echo "make: $(VENV) has no pip and ensurepip failed: remove $(VENV) and run make again" >&2; exit 1; }
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# pytest exit code 5 means "no tests collected": that is a failure here, never a pass.
test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(PY) -m depthkit.demo --out demo_out $(if $(filter 1,$(FRESH)),--fresh,) $(DEMO_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check depthkit kernels tests tools benchmarks
	$(PY) -m ruff format --check depthkit kernels tests tools benchmarks

format: $(STAMP)
	$(PY) -m ruff check --fix depthkit kernels tests tools benchmarks
	$(PY) -m ruff format depthkit kernels tests tools benchmarks

clean:
	rm -rf demo_out .pytest_cache
