"""Mercurial's hgweb served by Gateway, driven by the real `hg`: a clone, and a
push of a changeset with a large file, on each server and mode. Mercurial writes
bytes to sys.stdout.buffer, which every request of hgweb reaches."""

import os
import subprocess
from pathlib import Path

import pytest

from harness import EACH_SERVER_AND_MODE, VENV, WWW_DATA, real_app_server

GROUP = "hg"
BIG = 12 * 1024 * 1024
HG = str(Path(VENV) / "bin" / "hg")

# The served repository's own configuration: anyone may push, over plain http.
HGRC = "[web]\nallow-push = *\npush_ssl = false\n"


def hg(*args, cwd=None, server=None, timeout=300):
    """Runs the real hg with no user configuration; a failure shows its output and
    the end of the server's error log."""
    env = {**os.environ, "HGRCPATH": "", "HGPLAIN": "1", "HGUSER": "Test <t@example.test>", "no_proxy": "*"}
    r = subprocess.run([HG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log = server.log_text()[-3000:] if server else ""
    assert r.returncode == 0, f"hg {' '.join(args)} failed:\n{r.stdout}{r.stderr}\n{log}"
    return r.stdout.strip()


def served_repo(srv, work: Path) -> tuple[Path, str]:
    """The repository hgweb serves, owned by www-data (who must write it on push),
    with one changeset (made in work/src); returns its path and that changeset."""
    src = work / "src"
    hg("init", str(src))
    (src / "README").write_text("served by Gateway\n")
    (src / "data.bin").write_bytes(os.urandom(100_000))
    hg("commit", "-q", "-A", "-m", "first", cwd=src)
    repo = srv.apps / "real_apps" / "repos" / "hgrepo"
    repo.parent.mkdir(exist_ok=True)
    hg("clone", "-q", "-U", str(src), str(repo))
    (repo / ".hg" / "hgrc").write_text(HGRC)
    for p in [repo.parent, repo, *repo.rglob("*")]:
        os.chown(p, WWW_DATA.pw_uid, WWW_DATA.pw_gid)
    return repo, hg("log", "-r", "tip", "-T", "{node}", cwd=src)


@pytest.mark.parametrize("kind", EACH_SERVER_AND_MODE)
def test_hg_clone_and_push_of_a_large_file(kind, tmp_path):
    """`hg clone` gets the repository through hgweb, and a pushed changeset that adds
    a 12 MiB file lands in the served repository, byte for byte."""
    # hgweb in a daemon group runs as the server's default user (www-data).
    srv = real_app_server(kind, "/hg", "hg_app.py", GROUP)
    repo, first = served_repo(srv, tmp_path)
    with srv:
        url = f"http://127.0.0.1:{srv.port}/hg"
        clone = tmp_path / "clone"
        hg("clone", "-q", url, str(clone), server=srv)
        assert hg("log", "-r", "tip", "-T", "{node}", cwd=clone) == first
        assert (clone / "data.bin").read_bytes() == (tmp_path / "src" / "data.bin").read_bytes()

        big = os.urandom(BIG)
        (clone / "big.bin").write_bytes(big)
        hg("commit", "-q", "-A", "-m", "big", cwd=clone)
        pushed = hg("log", "-r", "tip", "-T", "{node}", cwd=clone)
        hg("push", "-q", url, cwd=clone, server=srv)

    assert hg("log", "-R", str(repo), "-r", "tip", "-T", "{node}") == pushed
    served = subprocess.run([HG, "cat", "-r", "tip", "big.bin"], cwd=repo, capture_output=True,
                            env={**os.environ, "HGRCPATH": ""}, check=True).stdout
    assert served == big
    assert "Traceback" not in srv.log_text(), srv.log_text()[-3000:]
