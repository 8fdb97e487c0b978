# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates the virtual environment it needs. torch is pinned for development and CI:
# pip has the CPU build of torch 2.13.0 on disk here, and an unpinned torch would pull a
# multi-GB CUDA build. The library itself declares a range (pyproject.toml). The tests
# cover the experiments framework too, so its extra (peers, scikit-learn, matplotlib) is
# installed here under the same torch pin.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LINTED := adaptive_lr tests experiments benchmarks

.PHONY: demo test lint bench paper clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,demo,experiments]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m adaptive_lr.demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/overhead.py

# The write-up, regenerated from the quick preset (resumable: finished runs are kept).
paper: $(VENV)/.installed
	$(PY) -m experiments run --preset quick --results results/quick --workers 2
	$(PY) -m experiments paper --results results/quick --preset quick

clean:
	rm -rf $(VENV) *.egg-info
