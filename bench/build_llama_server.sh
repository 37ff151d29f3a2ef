#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp source vendored in the llama-cpp-python sdist that this
# project pins, for bench/bench_concurrency.py only (it is never a dependency of the project).
#
#   bench/build_llama_server.sh            # -> .cache/llama-server-build/build/bin/llama-server
#
# Idempotent: does nothing when the binary exists and runs. The build is portable (GGML_NATIVE=OFF): a native
# build compiles AMX kernels that fault with SIGILL on CPUs that advertise AMX but cannot run it (see Makefile).
# It runs under `nice -n 10` with JOBS (default 2) compile jobs. Needs a C/C++ toolchain, CMake and pip access
# to PyPI; nothing else is downloaded (the web UI is not embedded, so the build fetches no UI assets).
#
# Environment: LLAMA_CPP_VERSION (default 0.3.36, as in the Makefile), JOBS, PYTHON (for `pip download`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
BASE="$ROOT/.cache/llama-server-build"
SDIST_DIR="$BASE/sdist"
SRC="$BASE/src/llama_cpp_python-$VERSION"
BUILD="$BASE/build"
BIN="$BUILD/bin/llama-server"

if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
    echo "llama-server already built: $BIN"
    exit 0
fi

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    mkdir -p "$SDIST_DIR"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi
if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
    rm -rf "$BASE/src"
    mkdir -p "$BASE/src"
    tar -xzf "$SDIST" -C "$BASE/src"
fi

# LLAMA_CURL is gone in this llama.cpp (a deprecated no-op, so it is not passed). LLAMA_USE_PREBUILT_UI=OFF keeps
# the build from downloading the web UI from Hugging Face; BUILD_SHARED_LIBS=OFF makes one self-contained binary.
nice -n 10 cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF \
    -DGGML_RPC=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DBUILD_SHARED_LIBS=OFF
nice -n 10 cmake --build "$BUILD" --target llama-server -j "$JOBS"

"$BIN" --version
echo "built: $BIN"
