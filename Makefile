# The two set-up commands of README.md. Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.demo

## Export EfficientNet-Lite0 and explain four scikit-image photographs with every method (RISE at 500 masks); browse out/demo/index.html.
demo: $(VENV)/.demo
	$(VENV)/bin/explainrt demo -o out/demo

## Run the whole test suite (what CI runs). pytest's "no tests collected" (exit 5) is a failure.
test: $(VENV)/.dev
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) out models .pytest_cache
