# The two commands of the README:
#   make demo   installs everything and runs the main job on its built-in default
#   make test   installs everything and runs the whole test suite (+ lint, types, docs)
# Both create .venv when it is missing.  torch==2.13.0 is installed *before* the
# package: pip then finds the local CPU wheel, and the package's `torch` range is
# already satisfied, so no multi-GB CUDA build is pulled in.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
HAS_DOCS := $(wildcard mkdocs.yml)
comma    := ,

.PHONY: demo test lint typecheck docs pytest clean

demo: $(VENV)/.installed-base
	$(PY) -m subriemann run --out subriemann-report

test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m mypy
ifneq ($(HAS_DOCS),)
	$(PY) -m mkdocs build --strict --site-dir site
endif
	$(PY) -m pytest -n 2 tests subriemann

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-torch: | $(PY)
	$(PIP) install "$(TORCH)"
	touch $@

$(VENV)/.installed-base: pyproject.toml $(VENV)/.installed-torch
	$(PIP) install -e .
	touch $@

# The test environment: test tools, linters, and the docs toolchain when the
# repository has a mkdocs.yml.  Re-installed when pyproject.toml or mkdocs.yml changes.
$(VENV)/.installed-test: pyproject.toml $(HAS_DOCS) $(VENV)/.installed-torch
	$(PIP) install -e ".[test,lint$(if $(HAS_DOCS),$(comma)docs)]"
	touch $@

clean:
	rm -rf $(VENV) site subriemann-report .pytest_cache .mypy_cache .ruff_cache .hypothesis
