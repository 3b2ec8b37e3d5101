"""The README's first command serves the demo with every built server and mode."""

import subprocess
import sys

from harness import ROOT


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
