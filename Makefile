# Every target creates or reuses .venv by itself, from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: venv test lint demo demo-weights bench clean

venv: $(STAMP)

# torch first, pinned to the on-disk CPU wheel, so the range in pyproject.toml installs nothing more.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q Testing

lint: $(STAMP)
	$(PY) -m ruff check .

# The main job on the bundled demo model: phantom CT, three donors, nodules, segmentations, panel, map.
demo: $(STAMP)
	$(PY) -m RadiogenomicGANLib.demo --out demo_output

clean:
	rm -rf $(VENV) demo_output .pytest_cache
