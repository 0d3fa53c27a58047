"""A server a test depends on, killed with SIGKILL mid-test, fails that test at once with one line
naming its exit code and signal (tests/processes.py), instead of a hang or an unrelated error."""

import textwrap
import time

INNER = textwrap.dedent('''
    import os, signal, socket, sys, threading, time
    from pathlib import Path

    import httpx
    import processes


    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]


    def test_server_killed_mid_test(tmp_path):
        port = free_port()
        log = tmp_path / "server.log"
        server = processes.start("toy server", [sys.executable, "-u", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                 log=log, ready_url=f"http://127.0.0.1:{port}/")
        threading.Timer(1.0, os.kill, (server.pid, signal.SIGKILL)).start()
        deadline = time.time() + 60
        while time.time() < deadline:  # what a test does while it relies on its server
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
            time.sleep(0.05)
        raise AssertionError("still running 60 s after the server was killed")


    def test_a_stopped_server_is_no_failure(tmp_path):
        port = free_port()
        server = processes.start("toy server", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                 log=tmp_path / "server.log", ready_url=f"http://127.0.0.1:{port}/")
        processes.stop(server, first=signal.SIGKILL)
        time.sleep(1)
''')


def test_a_server_killed_mid_test_fails_it_at_once_naming_code_and_signal(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(__import__("pathlib").Path(__file__).parent))
    pytester.makepyfile(test_inner=INNER)
    started = time.time()
    result = pytester.runpytest_subprocess("-p", "processes", "-q", "-p", "no:cacheprovider")
    took = time.time() - started
    result.assert_outcomes(passed=1, failed=1)
    lines = [line for line in result.outlines if "ServerDied: toy server (pid" in line]
    assert lines and "died: exit code -9 (SIGKILL); last log lines:" in lines[0], result.stdout.str()[-3000:]
    assert took < 30, f"the failure took {took:.0f} s: it should come the moment the server dies"
