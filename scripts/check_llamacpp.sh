#!/usr/bin/env bash
# Prove the llama-cpp-python build in .venv runs on this CPU, and that it holds no instruction past
# the portable baseline (x86-64 + AVX2/FMA/F16C/BMI2; no AVX-512, no AMX): a build made with
# -march=native on one machine died with SIGILL on another (issue #30).
#
#   1. objdump -d over llama_cpp's shared libraries: any zmm/k-mask register (AVX-512) or tile
#      instruction (AMX) is a failure, named with its count and library.
#   2. A server started on 127.0.0.1 with the embedded model answers one chat request.
#
# Writes .venv/llama-cpp-check.txt: "ok" or one line saying why not (tests/test_llamacpp_endpoint.py
# skips with that line); prints that line as a warning when it is not ok. Exit 0 only when ok.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=.venv/llama-cpp-check.txt
fail() { echo "$1" >"$OUT"; echo "WARNING: llama.cpp check: $1" >&2; exit 1; }

LIBDIR=$(.venv/bin/python -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')" 2>/dev/null) \
  || fail "llama_cpp does not import"
if command -v objdump >/dev/null 2>&1; then
  for lib in "$LIBDIR"/*.so*; do
    [ -f "$lib" ] || continue
    # AVX-512 uses zmm or k-mask registers ({%k1}); AMX tile instructions (tdp*, tileloadd, ldtilecfg); VNNI vpdpbusd/vpdpwssd.
    found=$(objdump -d --no-show-raw-insn "$lib" | grep -cE '%zmm[0-9]|\{%k[1-7]\}|\b(tdpb[a-z0-9]*|tileloadd[t1]*|ldtilecfg|tilezero|tilestored|vpdpbusds?|vpdpwssds?)\b')
    [ "$found" = 0 ] || fail "$(basename "$lib") holds $found AVX-512/AMX instructions: not a portable build (rebuild: rm -rf .venv && bash scripts/setup.sh --test)"
  done
else
  echo "note: objdump not found, instruction scan skipped" >&2
fi

.venv/bin/python - <<'EOF' >"$OUT.tmp" 2>&1
import os, signal, socket, subprocess, sys, tempfile, time
from pathlib import Path

import httpx

from medusa_bench.models import embedded_gguf

with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
log = Path(tempfile.mkstemp(suffix=".log")[1])
cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf("smollm2-135m")), "--host", "127.0.0.1",
       "--port", str(port), "--n_threads", "1", "--n_ctx", "512", "--verbose", "False"]
server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def died(when: str) -> None:
    code = server.returncode
    how = f"exit code {code}" + (f" ({signal.Signals(-code).name})" if code < 0 else "")
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    print(f"llama_cpp.server died {when}: {how}; log: {tail}")
    sys.exit(1)


try:
    deadline = time.time() + 120
    while True:
        if server.poll() is not None:
            died("while starting")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            print("llama_cpp.server did not start within 120 s")
            sys.exit(1)
        time.sleep(0.3)
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0}
    try:
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120).json()
        text = answer["choices"][0]["message"]["content"]
    except Exception as error:  # noqa: BLE001 - any failure of the one request is the finding
        time.sleep(0.5)
        if server.poll() is not None:
            died("on its first request")
        print(f"llama_cpp.server did not answer a chat request: {type(error).__name__}: {error}")
        sys.exit(1)
    print("ok")
finally:
    if server.poll() is None:
        server.terminate()
        server.wait(10)
    log.unlink(missing_ok=True)
EOF
status=$?
line=$(tail -1 "$OUT.tmp"); rm -f "$OUT.tmp"
[ $status = 0 ] && [ "$line" = ok ] || fail "${line:-the check crashed}"
echo ok >"$OUT"
echo "llama.cpp check: the portable build answers a request here (no AVX-512/AMX instructions in its libraries)"
