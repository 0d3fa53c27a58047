"""Processes a test depends on (servers, a Ray head) that fail the test the moment they die.

`watch(name, process, log)` registers a started `subprocess.Popen`. A monitor thread polls every
registered process; when one exits without `expect_exit()` having been called, the test that is
running fails at once with one line naming the process, its exit code and signal, followed by
the last lines of its log:

    ServerDied: llama.cpp server (pid 4242) died: exit code -9 (SIGKILL); last log lines: …

"At once" means the monitor interrupts the test's main thread with a signal (SIGUSR2) whose
handler raises `ServerDied` wherever the test is waiting (an HTTP call, `subprocess.run`, a
sleep), so a dead server never turns into a hang, a retry loop or a `FileNotFoundError` that
says nothing about the cause. The hooks in conftest.py install the handler and also check at the
start and end of each test, so a death the signal could not report (outside a test's call) is
still named by the next test that runs.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

POLL_S = 0.2
LOG_LINES = 15
INTERRUPT = signal.SIGUSR2


class ServerDied(Exception):
    """A watched process exited while a test needed it."""


@dataclass(eq=False)
class Watched:
    name: str
    process: subprocess.Popen
    log: Optional[Path] = None
    expected: bool = False  # set before a deliberate stop or kill
    reported: bool = False  # its death has been raised once
    died_at: Optional[float] = field(default=None, repr=False)

    def expect_exit(self) -> None:
        """The test or fixture is about to stop this process: its exit is no failure."""
        self.expected = True

    def death_line(self) -> str:
        code = self.process.returncode
        how = f"exit code {code}"
        if code is not None and code < 0:
            how += f" ({signal_name(-code)})"
        elif code is not None and code > 128:  # a shell's way of saying "killed by signal code - 128"
            how += f" ({signal_name(code - 128)}?)"
        tail = log_tail(self.log)
        return f"{self.name} (pid {self.process.pid}) died: {how}" + (f"; last log lines:\n{tail}" if tail else "")


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def log_tail(path: Optional[Path], lines: int = LOG_LINES) -> str:
    if path is None or not Path(path).is_file():
        return ""
    text = Path(path).read_text(errors="replace").rstrip().splitlines()
    return "\n".join("    " + line for line in text[-lines:])


_WATCHED: list[Watched] = []
_LOCK = threading.Lock()
_MAIN = threading.main_thread().ident
_in_test_call = threading.Event()  # set while a test function runs (conftest's hooks)
_monitor: Optional[threading.Thread] = None


def watch(name: str, process: subprocess.Popen, log: Optional[Path] = None) -> Watched:
    """Register `process`; a death without `expect_exit()` fails the running test."""
    watched = Watched(name, process, Path(log) if log else None)
    with _LOCK:
        _WATCHED.append(watched)
    _start_monitor()
    return watched


def start(name: str, cmd: list[str], *, log: Path, ready_url: Optional[str] = None,
          ready: Optional[Callable[[], bool]] = None, env: Optional[dict] = None, timeout: float = 120) -> subprocess.Popen:
    """Start a server, wait until `ready_url` answers 200 (or `ready()` is true), and watch it from then on.

    A server that exits while starting fails at once with the same one line (exit code, signal, log).
    """
    import httpx

    def answers() -> bool:
        if ready is not None:
            return ready()
        try:
            return httpx.get(ready_url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    handle = open(log, "w")
    process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
    handle.close()  # the child holds its own copy
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise ServerDied(Watched(name, process, Path(log)).death_line().replace(" died:", " died while starting:", 1))
        if answers():
            watch(name, process, log)
            return process
        time.sleep(0.3)
    process.kill()
    process.wait()
    raise RuntimeError(f"{name} was not ready ({ready_url or 'its check'}) within {timeout:.0f} s; last log lines:\n{log_tail(Path(log))}")


def stop(process: subprocess.Popen, first: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Stop a process on purpose (`first`, then SIGKILL after `timeout`) and forget it: no failure."""
    with _LOCK:
        watched = [w for w in _WATCHED if w.process is process]
    for w in watched:
        w.expect_exit()
    if process.poll() is None:
        process.send_signal(first)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for w in watched:
        forget(w)


def forget(watched: Watched) -> None:
    with _LOCK:
        if watched in _WATCHED:
            _WATCHED.remove(watched)


def unexpected_deaths() -> list[Watched]:
    """Watched processes that exited without being expected to, not reported yet (marks them reported)."""
    dead = []
    with _LOCK:
        for watched in _WATCHED:
            if not watched.expected and not watched.reported and watched.process.poll() is not None:
                watched.reported = True
                dead.append(watched)
    return dead


def raise_if_dead() -> None:
    dead = unexpected_deaths()
    if dead:
        raise ServerDied("\n".join(w.death_line() for w in dead))


def _on_interrupt(signum, frame) -> None:
    if _in_test_call.is_set():  # never inside pytest's own code between tests: the next test's start reports it
        raise_if_dead()


def install() -> None:
    """Called once from the main thread (conftest's pytest_configure)."""
    signal.signal(INTERRUPT, _on_interrupt)


def _start_monitor() -> None:
    global _monitor
    if _monitor is not None and _monitor.is_alive():
        return
    _monitor = threading.Thread(target=_poll, name="watched-processes", daemon=True)
    _monitor.start()


def _poll() -> None:
    while True:
        time.sleep(POLL_S)
        with _LOCK:
            died = [w for w in _WATCHED if not w.expected and not w.reported and w.died_at is None and w.process.poll() is not None]
            for watched in died:
                watched.died_at = time.time()
        if died and _in_test_call.is_set() and signal.getsignal(INTERRUPT) is _on_interrupt:
            signal.pthread_kill(_MAIN, INTERRUPT)  # the handler raises ServerDied in the test's thread


# ------------------------------------------------------------------ pytest hooks (tests/conftest.py loads this module as a plugin)
import pytest  # noqa: E402


def pytest_configure(config) -> None:
    install()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    raise_if_dead()  # a server that died between tests fails the next test that runs, by name
    _in_test_call.set()
    try:
        return (yield)
    except ServerDied:
        raise
    except Exception as error:  # the test failed some other way: was it because a server died?
        dead = unexpected_deaths()
        if dead:
            raise ServerDied("\n".join(w.death_line() for w in dead)) from error
        raise
    finally:
        _in_test_call.clear()
