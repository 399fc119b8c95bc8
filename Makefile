# Every target bootstraps .venv (pip) on first use. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pins: these wheels are cached on the dev/CI machines; change them for your own machine/CUDA.
TORCH ?= torch==2.14.1 torchvision==0.29.1
SWEEP ?= grid
ARGS ?=
NPROC ?= 2
NAME ?=
FORCE ?=

.DEFAULT_GOAL := help
.PHONY: help install train train-ddp test lint format tensorboard sweep optuna-dashboard bench rename clean clean-cache wandb-sweep wandb-agent

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $@

install: $(VENV)/.installed ## create .venv and install the project with all extras

train: install ## train with the defaults (ARGS="model=mlp ..." to override)
	$(BIN)/python train.py $(ARGS)

train-ddp: install ## data-parallel training on NPROC processes (GPUs, or CPUs with gloo) via torchrun
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) train.py trainer=ddp $(ARGS)

bench: install ## time the loop against a hand-written PyTorch loop (ARGS="--device cuda", --help)
	$(BIN)/python bench/bench.py $(ARGS)

test: install ## run the test suite
	$(BIN)/python -m pytest $(ARGS)

lint: install ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## ruff autofix + format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

tensorboard: install ## serve TensorBoard on outputs/
	$(BIN)/tensorboard --logdir outputs

sweep: install ## hyper-parameter sweep: SWEEP=grid|optuna (conf/sweep/), ARGS="hydra/launcher=parallel ..."
	$(BIN)/python train.py -m sweep=$(SWEEP) $(ARGS)

rename: install ## rename the project and its package: NAME=<package> [FORCE=1] (docs/rename.md)
	$(BIN)/python scripts/rename.py $(NAME) $(if $(FORCE),--force)
	touch $(VENV)/.installed

# The newest sweep dir holding an Optuna study, unless SWEEP_DIR=<sweep dir> is given.
SWEEP_DIR ?= $(shell ls -td outputs/*/multiruns/*/optuna.db outputs/*/multiruns/*/optuna.journal 2>/dev/null | head -n1 | xargs -r dirname)
optuna-dashboard: install ## optuna-dashboard on a sweep's study (SWEEP_DIR=<sweep dir>; default: the newest)
	@test -n "$(SWEEP_DIR)" || { echo "error: no Optuna study under outputs/*/multiruns/ (SWEEP_DIR): run make sweep SWEEP=optuna first" >&2; exit 2; }
	$(BIN)/optuna-dashboard $(if $(wildcard $(SWEEP_DIR)/optuna.db),sqlite:///$(SWEEP_DIR)/optuna.db,$(SWEEP_DIR)/optuna.journal) $(ARGS)

wandb-sweep: install ## create a W&B sweep from sweeps/wandb.yaml (then: wandb agent <the id it prints>)
	$(BIN)/wandb sweep sweeps/wandb.yaml

wandb-agent: install ## run W&B sweep jobs here: make wandb-agent SWEEP_ID=<entity/project/id> (the agent calls `python`)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/wandb agent $(SWEEP_ID)

clean: ## remove caches (keeps .venv, data/ and outputs/)
	rm -rf .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

clean-cache: ## empty the frozen-backbone feature cache (outputs/cache/features, paths.feature_cache)
	rm -rf outputs/cache/features
