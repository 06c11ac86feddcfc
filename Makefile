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

.PHONY: demo test clean

demo: $(VENV)/.installed-base
	$(PY) -m subriemann run --out subriemann-report --overwrite

# Every check runs even when an earlier one fails (so the test results are always
# shown); the target fails if any of them failed.
test: $(VENV)/.installed-test
	@status=0; \
	echo "== ruff check ."; $(PY) -m ruff check . || status=1; \
	echo "== mypy"; $(PY) -m mypy || status=1; \
	if [ -n "$(HAS_DOCS)" ]; then \
	    echo "== mkdocs build --strict"; NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site || status=1; \
	fi; \
	echo "== pytest -n 2 tests subriemann"; $(PY) -m pytest -n 2 tests subriemann || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: FAILED (see the sections above)"; fi; \
	exit $$status

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
