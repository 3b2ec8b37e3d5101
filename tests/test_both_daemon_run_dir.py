"""The daemons' run directory under attack, on Apache and nginx (issue 10, item 1
and 9b): the root supervisor writes exit records and binds sockets there, so the
server's worker user (any PHP or CGI script) must not be able to plant entries
that make root write through a symlink; and a socket removed by a tmp cleaner or
an operator comes back without a reload."""

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from harness import WWW_DATA, daemon_app, get_json, python_as, token, wait_for_pids

SECRET = b"root's own data\n"


def as_www_data(code, *args):
    """Runs Python `code` as the server's worker user; returns what it printed."""
    out = subprocess.run(python_as(WWW_DATA, code, *args), capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or out.stderr.strip()


PLANT = ("import os,sys\n"
         "try:\n os.symlink(sys.argv[1], sys.argv[2]); print('planted')\n"
         "except OSError as e:\n print(type(e).__name__)")


@pytest.fixture
def root_file():
    """A file only root may read, with known content, outside the run directory."""
    d = Path(tempfile.mkdtemp(prefix="gateway-root-"))
    f = d / "secret"
    f.write_bytes(SECRET)
    f.chmod(0o600)
    yield f
    shutil.rmtree(d)


def assert_untouched(f):
    st = f.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), oct(st.st_mode)
    assert f.read_bytes() == SECRET


def run_dir_of(srv):
    dirs = list(srv.runtime_dir.glob("gateway-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_a_planted_exit_record_symlink_does_not_make_root_overwrite_a_file(make_daemon_server, root_file):
    """The worker user links exit-<pid> of a live daemon to a root-only file and the
    daemon is killed mid-request: the file keeps its content and mode, and the
    operator still reads why the daemon died, from the supervisor and from the
    request it was serving."""
    title = f"gw-rundir-{token()}"
    srv = make_daemon_server([daemon_app("/slow", "slow"), daemon_app("/who", "whoami")],
                             {"g": f"processes=1 threads=2 display-name={title}"})
    with srv:
        victim = wait_for_pids(title, 1).pop()
        run_dir = run_dir_of(srv)
        planted = as_www_data(PLANT, str(root_file), str(run_dir / f"exit-{victim}"))
        statuses = []
        started = srv.marker("slow-started")
        request = threading.Thread(
            target=lambda: statuses.append(srv.get(f"/slow?s=5&token={started.name}", timeout=20)[0].status))
        request.start()
        # Killed while the application runs: a request not yet taken would be retried elsewhere.
        deadline = time.monotonic() + 10
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        request.join(timeout=20)
        srv.wait_for_log(f"daemon process {victim} of group 'g' was killed by signal 9 (SIGKILL); starting a replacement",
                         timeout=5)
        replacement = wait_for_pids(title, 1).pop()
        assert replacement != victim
        assert_untouched(root_file)
        assert planted == "PermissionError", planted
        assert statuses == [502]
        srv.wait_for_log(f"daemon process {victim} of group 'g' was killed by signal 9 (SIGKILL) while serving this "
                         "request", timeout=5)
        assert get_json(srv, "/who")["pid"] == replacement


def test_the_worker_user_cannot_create_or_replace_entries_in_the_run_directory(make_daemon_server, root_file):
    """The run directory belongs to root: the worker user can reach the sockets and
    read exit records but cannot plant the temporary socket name the supervisor
    binds, nor replace or remove a socket."""
    srv = make_daemon_server([daemon_app("/who", "whoami")], {"g": "processes=1 threads=1"})
    with srv:
        run_dir = run_dir_of(srv)
        assert as_www_data(PLANT, str(root_file), str(run_dir / ".g.12345")) == "PermissionError"
        replace = ("import os,sys\ntry:\n os.rename(sys.argv[1], sys.argv[2]); print('renamed')\n"
                   "except OSError as e:\n print(type(e).__name__)")
        assert as_www_data(replace, str(run_dir / "g.sock"), str(run_dir / "g.old")) == "PermissionError"
        assert get_json(srv, "/who")["uid"] == WWW_DATA.pw_uid
        dst = run_dir.stat()
        assert (dst.st_uid, dst.st_gid, stat.S_IMODE(dst.st_mode)) == (0, WWW_DATA.pw_gid, 0o710)
    assert_untouched(root_file)


def test_a_deleted_socket_is_recreated_without_a_reload(make_daemon_server):
    """A tmp cleaner removes a group's socket and the daemon then dies: within
    seconds requests are answered again, without a reload, and the log says why."""
    title = f"gw-rebind-{token()}"
    srv = make_daemon_server([daemon_app("/who", "whoami")], {"g": f"processes=1 threads=2 display-name={title}"})
    with srv:
        victim = wait_for_pids(title, 1).pop()
        sock = run_dir_of(srv) / "g.sock"
        sock.unlink()
        # Kill the daemon too, so that no pooled connection to it hides the loss.
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        statuses = []
        while time.monotonic() < start + 10:
            statuses.append(srv.get("/who", timeout=10)[0].status)
            if statuses[-1] == 200:
                break
            time.sleep(0.1)
        assert statuses[-1] == 200, (statuses, srv.log_text()[-3000:])
        # The supervisor looks for its sockets every second; a daemon starts in under one.
        assert time.monotonic() - start < 4, (time.monotonic() - start, statuses)
        assert [srv.get("/who", timeout=10)[0].status for _ in range(10)] == [200] * 10
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (WWW_DATA.pw_uid, 0o600)
        assert f"the socket of daemon group 'g' ({sock}) was removed" in srv.log_text()
