# Two entry points (see README): `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
# Exact torch pins for this machine kind (they install from local disk); the package itself
# accepts a range (pyproject.toml). Override on other machines: make demo TORCH_PINS="torch".
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
BIN = $(VENV)/bin

.PHONY: demo test test-slurm test-browser slurm-start slurm-stop install install-dev lint bench clean-demo
# where scripts/slurm-local/start.sh keeps the local SLURM's config, state and logs
SLURM_LOCAL_BASE ?= /tmp/decon-slurm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[tensorboard]'

install-dev: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'

# The main job on its embedded default: the whole lifecycle on this machine. The `demo` grid
# (4 variants x 2 seeds of tiny runs on the offline digits data) goes to the local executor,
# a live table shows it while it trains, then verify, export and report; every run's curves
# are in TensorBoard event files (the [tensorboard] extra), the last line says how to open them.
DEMO_ROOT ?= runs/demo
demo: install
	$(BIN)/decon submit --grid demo --executor local --root $(DEMO_ROOT) --wait
	$(BIN)/decon verify --root $(DEMO_ROOT)
	$(BIN)/decon export $(DEMO_ROOT)/results.csv --root $(DEMO_ROOT) --force
	$(BIN)/decon report --root $(DEMO_ROOT) --out $(DEMO_ROOT)/report
	@echo "dataset: $(DEMO_ROOT)/results.csv  report: $(DEMO_ROOT)/report/report.html"
	@echo "curves: $(BIN)/tensorboard --logdir $(DEMO_ROOT)/runs  (then open http://localhost:6006)"

test: install-dev
	@command -v tmux >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q tmux) || echo "no tmux: the monitor --watch terminal test skips"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# The SLURM suite against a real single-node SLURM on this machine (root, Debian 12: the
# script installs slurm + mariadb packages on first use). `make slurm-stop` stops it.
test-slurm: install-dev slurm-start
	SLURM_CONF=$(SLURM_LOCAL_BASE)/etc/slurm.conf OMP_NUM_THREADS=1 $(BIN)/pytest -q -m slurm

slurm-start:
	SLURM_LOCAL_BASE=$(SLURM_LOCAL_BASE) bash scripts/slurm-local/start.sh

slurm-stop:
	SLURM_LOCAL_BASE=$(SLURM_LOCAL_BASE) bash scripts/slurm-local/stop.sh
# CI-only: report.html in headless Debian chromium, every image decoded, and TensorBoard's
# scalars page drawing a demo-like sweep's curves (needs root for apt).
test-browser: install-dev
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -m browser

bench: install-dev  # side-by-side speed ratios, see docs/performance.md
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_train.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_augment.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_metrics.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_concurrent.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_monitor.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_export.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_stop.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_tensorboard.py
