"""The README's first command serves the demo with every built server and mode,
and stops them however it ends."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from harness import ROOT, pgrep


def test_demo_serves_every_server_and_mode():
    r = subprocess.run([sys.executable, str(ROOT / "demo" / "run"), "--check"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    served = [line for line in r.stdout.splitlines() if line.startswith("== ")]
    assert "== Apache, embedded" in r.stdout and "== nginx, embedded" in r.stdout, r.stdout
    assert r.stdout.count("Hello from Gateway!") == len(served), r.stdout
    for mode in ("embedded", "daemon"):
        for line in served:
            if f", {mode}:" in line:
                assert f"mode:          {mode}" in r.stdout


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_demo_stops_its_servers_when_its_terminal_closes_or_it_is_terminated(sig):
    """A closed terminal (SIGHUP) or a kill (SIGTERM) stops the servers the demo
    started, on the ports GATEWAY_DEMO_PORTS gave it, as Ctrl-C does."""
    tmp = Path(tempfile.mkdtemp(prefix="demo-signal-"))
    tmp.chmod(0o755)
    daemons_before = pgrep("-fx", "gateway-demo")
    env = {**os.environ, "TMPDIR": str(tmp), "GATEWAY_DEMO_PORTS": "21000-21099", "PYTHONUNBUFFERED": "1"}
    demo = subprocess.Popen([sys.executable, str(ROOT / "demo" / "run")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(120, demo.kill)
    watchdog.start()
    servers: set[int] = set()
    try:
        output = ""
        for line in demo.stdout:
            output += line
            if line.startswith("Serving"):
                break
        assert "Serving" in output, output
        ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)/", output)]
        servers = pgrep("-f", str(tmp))
        daemons = pgrep("-fx", "gateway-demo") - daemons_before
        assert servers and ports and all(port_open(p) for p in ports), output
        demo.send_signal(sig)
        demo.wait(timeout=60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(p) for p in servers | daemons):
            time.sleep(0.1)
        assert not [p for p in servers | daemons if alive(p)], "the demo's servers outlived it"
        assert not [p for p in ports if port_open(p)], output
        assert not list(tmp.glob("gateway-*")), "the demo left its servers' directories"
        assert all(21000 <= p <= 21099 for p in ports), ports
    finally:
        watchdog.cancel()
        if demo.poll() is None:
            demo.kill()
        for pid in servers:
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)
