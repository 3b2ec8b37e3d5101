"""Installation into the servers' standard places, and the Docker files (which
cannot be built here) kept honest against the repository."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from harness import APACHE_MODULES, MODULES, ROOT, Apache, Mount, Settings, built, pgrep, run_make

DOCKER = ROOT / "docker"


def dockerfiles():
    return sorted(DOCKER.glob("*.Dockerfile"))


def test_there_is_an_image_per_server():
    assert {p.name for p in dockerfiles()} == {"apache.Dockerfile", "nginx.Dockerfile"}


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_dockerfiles_copy_only_files_that_exist(dockerfile):
    copies = 0
    for line in dockerfile.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        words = shlex.split(line)
        if any(w.startswith("--from") for w in words):
            continue
        for source in words[1:-1]:
            copies += 1
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such file in the repository"
    assert copies > 0


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_dockerfiles_install_like_ci(dockerfile):
    """One install recipe for CI and images: the Dockerfiles and .ci/run both run tools/install-deps."""
    assert "tools/install-deps" in dockerfile.read_text()
    assert "tools/install-deps" in (ROOT / ".ci" / "run").read_text()


RELEASES = ("bookworm", "trixie")


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_dockerfiles_build_on_either_release(dockerfile):
    """Both stages take their Debian release from one build argument, so the module is built
    against the very server (and nginx build signature) the image runs."""
    text = dockerfile.read_text()
    assert "ARG DEBIAN=bookworm" in text
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["rust:1-${DEBIAN}", "debian:${DEBIAN}"], froms


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_dockerfiles_last_stage_installs_what_serving_needs(dockerfile):
    """The image's last stage installs with the same script, in its --run mode, which must work
    on this machine too (everything it names is installed here, so it installs nothing)."""
    server = dockerfile.name.split(".")[0]
    assert f"gateway-install-deps --run {server}" in dockerfile.read_text()
    r = subprocess.run([ROOT / "tools" / "install-deps", "--run", server], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_runs_both_servers_on_both_releases():
    import yaml

    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    built = {(s["build"]["dockerfile"], s["build"]["args"]["DEBIAN"]) for s in services.values() if "build" in s}
    assert built == {(f"docker/{p.name}", r) for p in dockerfiles() for r in RELEASES}
    assert set(services["check"]["depends_on"]) == {n for n, s in services.items() if "build" in s}


def test_compose_builds_the_dockerfiles_that_exist():
    text = (DOCKER / "compose.yaml").read_text()
    referenced = re.findall(r"dockerfile:\s*(\S+)", text)
    assert referenced, text
    for path in referenced:
        assert (ROOT / path).exists(), path
    for conf in re.findall(r"COPY (docker/\S+)", "".join(p.read_text() for p in dockerfiles())):
        assert (ROOT / conf).exists(), conf


def test_apache_install_to_another_layout_serves_requests(tmp_path):
    """APACHE_MODDIR/APACHE_CONFDIR relocate the install; the .load snippet it writes works, and
    the module finds the daemon executable installed next to it."""
    moddir, confdir = tmp_path / "modules", tmp_path / "mods-available"
    r = run_make("install-apache", f"APACHE_MODDIR={moddir}", f"APACHE_CONFDIR={confdir}")
    assert r.returncode == 0, r.stdout + r.stderr
    load = (confdir / "gateway.load").read_text()
    assert f"LoadModule gateway_module {moddir}/mod_gateway.so" in load
    assert os.access(moddir / "gateway-daemon", os.X_OK)
    srv = Apache([Mount("/app", "hello.py"), Mount("/d", "hello.py", mode="daemon", group="g")],
                 Settings(daemons={"g": "processes=1 threads=1"}))
    conf = srv.write_config()
    # Load the module through the installed snippet instead of the build tree.
    text = conf.read_text().replace(f"LoadModule gateway_module {MODULES}/mod_gateway.so", f"Include {confdir}/gateway.load")
    conf.write_text(text)
    srv.write_config = lambda: conf
    with srv:
        assert srv.get("/app")[1] == b"Hello, world!"
        assert srv.get("/d")[1] == b"Hello, world!"
        daemons = pgrep("-fx", r"\(gateway:g\)")
        assert [os.readlink(f"/proc/{pid}/exe") for pid in daemons] == [str(moddir / "gateway-daemon")]
    r = run_make("uninstall-apache", f"APACHE_MODDIR={moddir}", f"APACHE_CONFDIR={confdir}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (moddir / "mod_gateway.so").exists() and not (confdir / "gateway.load").exists()
    assert not (moddir / "gateway-daemon").exists()


@pytest.mark.parametrize("server,module", [("apache", "mod_gateway.so"), ("nginx", "ngx_http_gateway_module.so")])
def test_uninstall_from_a_staging_tree_removes_the_directories_install_made(tmp_path, server, module):
    """make install DESTDIR=... makes the servers' directories in the staging tree;
    make uninstall removes them again once empty, and only those."""
    if not (MODULES / module).exists():
        pytest.skip(f"{module} is not built")
    stage = tmp_path / "stage"
    (stage / "usr" / "lib").mkdir(parents=True)
    (stage / "usr" / "lib" / "someone-elses").write_text("")
    (stage / "srv" / "empty-but-not-ours").mkdir(parents=True)
    before = sorted(stage.rglob("*"))
    r = run_make(f"install-{server}", f"DESTDIR={stage}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (stage / "usr" / "share" / "nginx" if server == "nginx" else stage / "etc" / "apache2").is_dir()
    r = run_make(f"uninstall-{server}", f"DESTDIR={stage}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(stage.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/sbin/a2enmod").exists(), reason="needs root and Debian's apache2")
def test_system_install_enables_with_a2enmod():
    wsgi_enabled = Path("/etc/apache2/mods-enabled/wsgi.load").exists()
    wsgi_installed = Path("/etc/apache2/mods-available/wsgi.load").exists()
    r = run_make("install-apache")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        assert (APACHE_MODULES / "mod_gateway.so").exists()
        r = subprocess.run(["a2enmod", "gateway"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert Path("/etc/apache2/mods-enabled/gateway.load").resolve() == Path("/etc/apache2/mods-available/gateway.load")
        if wsgi_installed:
            # Beside mod_wsgi, Debian's configtest fails and says what to do.
            subprocess.run(["a2enmod", "-q", "wsgi"], check=True)
            r = subprocess.run(["apache2ctl", "-t"], capture_output=True, text=True)
            assert r.returncode != 0 and "a2dismod wsgi" in r.stdout + r.stderr, r.stdout + r.stderr
            subprocess.run(["a2dismod", "-q", "wsgi"], check=True)
        # Debian's own configuration now loads the module.
        r = subprocess.run(["apache2ctl", "-t", "-D", "DUMP_MODULES"], capture_output=True, text=True)
        assert "gateway_module (shared)" in r.stdout, r.stdout + r.stderr
    finally:
        if wsgi_enabled:
            subprocess.run(["a2enmod", "-q", "wsgi"], check=True)
        r = run_make("uninstall-apache")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (APACHE_MODULES / "mod_gateway.so").exists()
    assert not Path("/etc/apache2/mods-enabled/gateway.load").exists()
    assert not Path("/etc/apache2/mods-available/gateway.load").exists()


def build_script():
    """The compiled build script (build.rs) of the newest module build."""
    scripts = sorted(ROOT.glob("target/*/release/build/gateway-*/build-script-build"), key=lambda p: p.stat().st_mtime)
    assert scripts, "build the modules first (make)"
    return scripts[-1]


@pytest.mark.parametrize("feature,env,message", [
    ("APACHE", {"APXS": "/nonexistent/apxs"}, "Apache httpd headers not found: install them (Debian: apt-get install apache2-dev)"),
    ("NGINX", {"NGINX_SRC": "/nonexistent/src"}, "nginx sources not found (/nonexistent/src/configure is missing): install them (Debian: apt-get install nginx-dev)"),
    ("APACHE", {"LIBCLANG_PATH": "/nonexistent"}, "libclang is needed to generate the server bindings: install it (Debian: apt-get install libclang-dev)"),
])
def test_build_says_what_to_install(tmp_path, feature, env, message):
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("CARGO_FEATURE_")}
    run_env.update({f"CARGO_FEATURE_{feature}": "1", "OUT_DIR": str(tmp_path)}, **env)
    r = subprocess.run([str(build_script())], cwd=ROOT, env=run_env, capture_output=True, text=True)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_build_refuses_a_python_without_shared_library():
    r = run_make("check-python", "PYTHON=/bin/true")
    assert r.returncode != 0
    assert "has no shared libpython" in r.stderr and "python3-dev" in r.stderr, r.stderr


def test_nginx_install_checks_the_module_fits_the_installed_nginx():
    """nginx's own check refuses a module that is not built for it, before anything is installed."""
    r = subprocess.run([str(ROOT / "tools" / "check-nginx-module"), str(MODULES / "mod_gateway.so")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "does not fit" in r.stderr and "Rebuild it against this nginx's sources" in r.stderr, r.stderr
    if built("nginx", daemon=False):
        r = subprocess.run([str(ROOT / "tools" / "check-nginx-module"), str(MODULES / "ngx_http_gateway_module.so")],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "fits" in r.stdout, r.stdout + r.stderr
        r = run_make("install-nginx", "NGINX=/nonexistent/nginx", "DESTDIR=/nonexistent-stage")
        assert r.returncode != 0 and "/nonexistent/nginx not found" in r.stderr, r.stderr
        assert not Path("/nonexistent-stage").exists()
