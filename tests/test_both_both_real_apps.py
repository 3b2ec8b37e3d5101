"""Real applications driven by their real clients: dulwich's git server with the
real `git clone` and a chunked `git push`, on each server and mode; and the
process environment that daemon processes get when the server was started from a
root shell (a git push then must not look for /root/.gitconfig)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from harness import DAEMON_KINDS, EACH_SERVER_AND_MODE, WWW_DATA, real_app_server

GROUP = "apps"
BIG = 20 * 1024 * 1024

# What a root shell leaves in the environment of the servers it starts.
SHELL_ENV = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "OLDPWD": "/x",
             "SECRET_TOKEN": "y", "LANG": "C.UTF-8"}


def real_server(kind, prefix, script):
    """`script` at `prefix`; in the "-daemon" kinds in a daemon group that runs as www-data."""
    return real_app_server(kind, prefix, script, GROUP, extra="user=www-data")


def add_main_directives(srv, lines):
    """Puts nginx main-context directives (`env`) at the top of its configuration."""
    write = srv.write_config

    def write_config():
        conf = write()
        conf.write_text("\n".join(lines) + "\n" + conf.read_text())
        return conf

    srv.write_config = write_config


@pytest.mark.parametrize("kind", DAEMON_KINDS)
def test_daemons_started_from_a_root_shell_get_their_users_environment(kind, monkeypatch):
    """A daemon group running as www-data sees www-data's HOME, USER and LOGNAME, not
    the root shell's HOME (git would read /root/.gitconfig and fail), OLDPWD or a
    token the operator happened to have exported; under nginx it gets what the
    `env` directives keep, as nginx's own workers do."""
    for name, value in SHELL_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GATEWAY_KEPT", "kept")
    srv = real_server(kind, "/env", "environ_app.py")
    if kind.startswith("nginx"):
        add_main_directives(srv, ["env GATEWAY_KEPT;", "env GATEWAY_SET=set;"])
    with srv:
        resp, body = srv.get("/env")
        assert resp.status == 200, body
        env = json.loads(body)
    assert env["HOME"] == WWW_DATA.pw_dir == "/var/www"
    assert env["USER"] == env["LOGNAME"] == "www-data"
    assert "OLDPWD" not in env and "SECRET_TOKEN" not in env, env
    assert env.get("PATH"), env
    if kind.startswith("nginx"):
        assert env["GATEWAY_KEPT"] == "kept" and env["GATEWAY_SET"] == "set", env
        assert "LANG" not in env, env
    else:
        # Apache passes its locale, time zone and search path, not its caller's other variables.
        assert env["LANG"] == "C.UTF-8"
        assert "GATEWAY_KEPT" not in env, env


def git(*args, cwd=None, server=None, timeout=300):
    """Runs git; a failure shows git's output and the end of the server's error log."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "t@example.test",
           "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "t@example.test", "no_proxy": "*"}
    r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log = server.log_text()[-3000:] if server else ""
    assert r.returncode == 0, f"git {' '.join(args)} failed:\n{r.stdout}{r.stderr}\n{log}"
    return r.stdout.strip()


def served_repo(srv, work: Path) -> tuple[Path, str]:
    """A bare repository served by the git app, owned by www-data, with one commit
    (made in work/src); returns its path and that commit."""
    src = work / "src"
    git("init", "-q", "-b", "main", str(src))
    (src / "README").write_text("served by Gateway\n")
    (src / "data.bin").write_bytes(os.urandom(100_000))
    git("add", ".", cwd=src)
    git("commit", "-q", "-m", "first", cwd=src)
    repo = srv.apps / "real_apps" / "repos" / "repo.git"
    git("clone", "-q", "--bare", str(src), str(repo))
    for p in [repo.parent, repo, *repo.rglob("*")]:
        os.chown(p, WWW_DATA.pw_uid, WWW_DATA.pw_gid)
    return repo, git("rev-parse", "HEAD", cwd=src)


@pytest.mark.parametrize("kind", EACH_SERVER_AND_MODE)
def test_dulwich_serves_git_clone_and_a_chunked_push(kind, tmp_path, monkeypatch):
    """`git clone` gets the repository, and a push of a 20 MiB file, which git sends
    chunked (http.postBuffer is smaller), lands in the server's repository: dulwich
    must not de-chunk a body that the server already de-chunked."""
    if kind == "apache-event":
        # Apache's own workers keep the environment Apache was started with (so do
        # mod_wsgi's); started by systemd it has no HOME pointing at /root.
        monkeypatch.delenv("HOME", raising=False)
    srv = real_server(kind, "/git", "git_app.py")
    repo, first = served_repo(srv, tmp_path)
    with srv:
        url = f"http://127.0.0.1:{srv.port}/git/repo.git"
        clone = tmp_path / "clone"
        git("clone", "-q", url, str(clone), server=srv)
        assert git("rev-parse", "HEAD", cwd=clone) == first
        assert (clone / "data.bin").read_bytes() == (tmp_path / "src" / "data.bin").read_bytes()

        (clone / "big.bin").write_bytes(os.urandom(BIG))
        git("add", "big.bin", cwd=clone)
        git("commit", "-q", "-m", "big", cwd=clone)
        pushed = git("rev-parse", "HEAD", cwd=clone)
        git("-c", "http.postBuffer=65536", "push", "-q", "origin", "main", cwd=clone, server=srv)

    from dulwich.repo import Repo

    with Repo(str(repo)) as served:
        assert served.refs[b"refs/heads/main"].decode() == pushed
        tree = served[served[pushed.encode()].tree]
        assert served[tree[b"big.bin"][1]].raw_length() == BIG
