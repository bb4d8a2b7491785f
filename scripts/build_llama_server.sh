#!/usr/bin/env bash
# Builds llama.cpp's llama-server from the llama.cpp that the pinned llama-cpp-python vendors, so `make bench`
# compares lmsd with llama-server on the very same inference code. Usage (what `make llama-server` runs):
#
#   scripts/build_llama_server.sh VERSION
#
# VERSION is llama-cpp-python's (constraints.txt). The binary goes to
# $LMS_DEV_CACHE/llama-server/VERSION/llama-server, outside the repo; when it is there, nothing is done.
# The sdist comes from the package registry (the only network CI has) and is kept next to the binary; the
# build is CPU only, without curl or OpenSSL, without the web UI (which would be downloaded), under
# `nice -n 19` and with $LLAMA_SERVER_JOBS (2) jobs, about 20-25 minutes on 2 cores.
# Environment: LMS_DEV_CACHE (~/.cache/lms-dev), PY (the venv's python; pip and, when the system has no usable
# cmake, cmake come through it), LLAMA_SERVER_JOBS (2).
set -euo pipefail

VERSION=${1:?usage: $0 LLAMA_CPP_PYTHON_VERSION}
CACHE=${LMS_DEV_CACHE:-$HOME/.cache/lms-dev}
PY=${PY:-$CACHE/venv/bin/python}
JOBS=${LLAMA_SERVER_JOBS:-2}
DIR=$CACHE/llama-server/$VERSION
BIN=$DIR/llama-server

if [ -x "$BIN" ]; then
    echo "llama-server for llama-cpp-python $VERSION is there: $BIN"
    exit 0
fi
[ -x "$PY" ] || PY=$(command -v python3)
mkdir -p "$DIR"
started=$(date +%s)

# 1. The sdist, once.
SDIST=$DIR/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
    echo "downloading the llama-cpp-python $VERSION sdist"
    "$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DIR/download"
    mv "$(ls "$DIR"/download/llama_cpp_python-"$VERSION".tar.gz "$DIR"/download/llama-cpp-python-"$VERSION".tar.gz \
        2>/dev/null | head -n1)" "$SDIST"
    rm -rf "$DIR/download"
fi

# 2. Unpacked into a work folder that survives an interrupted build (cmake then goes on where it stopped).
WORK=$DIR/work
SRC=$WORK/src/vendor/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    rm -rf "$WORK"
    mkdir -p "$WORK/src"
    tar -xzf "$SDIST" -C "$WORK/src" --strip-components=1
fi
[ -f "$SRC/tools/server/CMakeLists.txt" ] || [ -f "$SRC/examples/server/CMakeLists.txt" ] || {
    echo "no server sources in $SRC: this llama.cpp has no llama-server" >&2; exit 1; }

# 3. cmake: the system's when it is new enough for this llama.cpp, else pip's into the venv.
need=$(sed -n 's/^cmake_minimum_required(VERSION \([0-9.]*\).*/\1/p' "$SRC/CMakeLists.txt" | head -n1)
CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ] || ! printf '%s\n%s\n' "${need:-3.14}" "$("$CMAKE" --version | sed -n 's/^cmake version //p')" \
        | sort -V -C; then
    echo "installing cmake into $(dirname "$PY") with pip (the system has ${CMAKE:-none} below ${need:-3.14})"
    "$PY" -m pip install --quiet cmake
    CMAKE=$(dirname "$PY")/cmake
fi

# 4. Configure. Options are passed only when this llama.cpp has them (they were renamed over the versions):
# no curl and no OpenSSL (no model downloads), no web UI (its assets would be downloaded), no tests or examples.
flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON)
for opt in LLAMA_CURL LLAMA_OPENSSL LLAMA_BUILD_UI LLAMA_USE_PREBUILT_UI LLAMA_BUILD_WEBUI LLAMA_USE_PREBUILT_WEBUI \
           GGML_CUDA GGML_VULKAN GGML_METAL GGML_BLAS; do
    if grep -rqs "option(${opt}[[:space:]]" "$SRC/CMakeLists.txt" "$SRC/ggml/CMakeLists.txt"; then
        flags+=("-D${opt}=OFF")
    fi
done
echo "configuring llama.cpp (llama-cpp-python $VERSION) with: ${flags[*]}"
nice -n 19 "$CMAKE" -S "$SRC" -B "$WORK/build" "${flags[@]}" >"$WORK/configure.log" 2>&1 || {
    tail -n 40 "$WORK/configure.log" >&2; echo "configure failed; full log: $WORK/configure.log" >&2; exit 1; }

# 5. Build only llama-server, gently: the machine is shared with test suites.
echo "building llama-server with $JOBS jobs under nice -n 19 (about 20-25 minutes on 2 cores)"
nice -n 19 "$CMAKE" --build "$WORK/build" --target llama-server -j "$JOBS" >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log" >&2; echo "build failed; full log: $WORK/build.log" >&2; exit 1; }

built=$(find "$WORK/build" -type f -name llama-server -perm -u+x | head -n1)
[ -n "$built" ] || { echo "the build ended without a llama-server binary" >&2; exit 1; }
"$built" --version >/dev/null 2>&1 || { echo "$built does not run" >&2; "$built" --version >&2 || true; exit 1; }
install -m 0755 "$built" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
rm -rf "$WORK"
echo "installed $BIN ($("$BIN" --version 2>&1 | grep -m1 -i version || true)) in $(( $(date +%s) - started )) s"
