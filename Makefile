# Two commands matter: `make demo` and `make test`. Each installs what it needs first.
#
# GPU users: install your CUDA build of torch 2.13 into .venv first (or set TORCH_SPEC /
# PIP_EXTRA_INDEX_URL); `make install` keeps an installed torch 2.13.x and never replaces it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# The suite runs on TEST_WORKERS processes (pytest-xdist), each test file whole on one of them, so a
# file's module fixtures (trained reference runs, traced models) are built once. 0 runs it in this process.
TEST_WORKERS ?= 2

.PHONY: install browser demo test test-fast lint bench check-wheel clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.') else 1)" 2>/dev/null \
		|| $(PY) -m pip install -q "$(TORCH_SPEC)"
	@# DeepSpeed (peers extra) ships only an sdist whose setup.py imports torch: build it against the torch
	@# installed above, not in an isolated build environment (which would fetch another, multi-GB torch).
	$(PY) -m pip install -q -c requirements/constraints.txt setuptools
	$(PY) -m pip install -q --no-build-isolation -c requirements/constraints.txt deepspeed
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[test,hf,peers]"
	@touch $(STAMP)

demo: install
	$(PY) -m planner plan --model gpt3-175b --cluster dgx-a100-80g --nodes 128 --global-batch 1536 \
		-o out/gpt3-175b.plan.json --force
	@# this machine as the planner prices it: 2 processes' compute share, gloo's collectives, dispatch
	$(PY) -m bench.cpu_profile --nproc 2 -o out/cpu-profile.json --cluster-out out/cpu-local-profiled.json \
		--constants-out out/cpu-constants.json > /dev/null
	$(PY) -m planner plan --model gpt-10m --cluster out/cpu-local-profiled.json --constants out/cpu-constants.json \
		--pp 2 --global-batch 8 -o out/gpt-10m.plan.json --force
	$(PY) -m runtime run out/gpt-10m.plan.json --nproc 2 --steps 5 --out out/gpt-10m.metrics.json --force

# The HTML report's test drives a headless Chromium (tests/core/test_report_html.py): Debian's package,
# installed only when none is on PATH, apt-get exists and we are root; otherwise that test skips, saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] \
		|| (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null)

test: install browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not multiprocess and not slow" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check planner runtime tests bench tools

bench: install
	$(PY) -m bench

# A non-editable install (wheel into a temp dir, run from outside the checkout) plans GPT-3 175B and
# gpt-tiny, and trains the gpt-tiny plan for 2 steps on 2 processes.
check-wheel: install
	$(PY) -m tools.check_wheel --big --run

clean:
	rm -rf out .pytest_cache .ruff_cache
