# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates the virtual environment it needs. torch is pinned for development and CI:
# pip has the CPU build of torch 2.13.0 on disk here, and an unpinned torch would pull a
# multi-GB CUDA build; constraints.txt pins every other package too, so that a fresh
# install computes the same experiment records. The library itself declares a range
# (pyproject.toml). The tests cover the experiments framework too, so its extra (peers,
# scikit-learn, matplotlib) is installed here under the same torch pin.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LINTED := adaptive_lr tests experiments benchmarks

.PHONY: demo test lint bench paper paper-full clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,demo,experiments,integrations]"
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

# Everything in papers/paper.md: the quick preset, the targets grid on every task (about an
# hour on 2 cores) and the benchmarks (about 45 minutes); each step resumes or reruns.
paper-full: $(VENV)/.installed
	$(PY) -m experiments run --preset quick --results results/quick --workers 2
	$(PY) -m experiments run --config experiments/configs/targets_all.toml --results results/targets_all --workers 2
	$(PY) benchmarks/quadratic_limit.py --output results/quadratic_limit.json
	$(PY) benchmarks/overhead.py --sizes 10k 1M 10M --optimizers sgd adamw --threads 2 --output results/overhead.json
	$(PY) benchmarks/overhead.py --sizes 50M --optimizers sgd adamw --threads 2 --large-repeats 5 --warmup 2 \
		--no-rss --output results/overhead_large.json
	$(PY) benchmarks/overhead.py --sizes 1M --depths 4 64 --optimizers sgd adamw --threads 2 --no-rss --repeats 9 \
		--output results/overhead_tensors.json
	$(PY) benchmarks/overhead.py --sizes 1M 10M --optimizers sgd adamw --threads 2 --probe-solver krylov \
		--output results/overhead_krylov.json
	$(PY) benchmarks/probe_warm_start.py --output results/probe_warm_start.json
	$(PY) -m experiments paper --results results/quick --preset quick \
		--targets-results results/targets_all --benchmarks results

clean:
	rm -rf $(VENV) *.egg-info
