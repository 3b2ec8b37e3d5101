"""Every example in conf/ works: with its paths pointed at the test apps it
passes the server's configuration test and serves the request its `# Try:`
line shows. So do the README's configuration blocks, pasted as they are."""

import re

import pytest
from harness import APACHE_MODULES, ROOT, SERVER_CLASS, VENV, Settings, built

EXAMPLES = sorted((ROOT / "conf").glob("*.conf"))


def localise(text, srv):
    """Points an example's /srv paths and port 80 at this test server."""
    apps = srv.apps
    for placeholder, real in [("/srv/venv", VENV), ("/srv/hello/wsgi.py", apps / "hello.py"),
                              ("/srv/fastapi/main.py", apps / "fastapi_app.py"), ("/srv/fastapi", apps),
                              ("/srv/mysite/mysite/asgi.py", apps / "django_asgi" / "site_asgi.py"),
                              ("/srv/mysite", apps / "django_asgi"),
                              ("/srv/hello", apps), ("/srv/lib", apps / "lib"),
                              ("/srv/django", apps / "django_site"), ("/srv/flask", apps)]:
        text = text.replace(placeholder, str(real))
    text = text.replace("<VirtualHost *:80>", f"<VirtualHost 127.0.0.1:{srv.port}>")
    text = re.sub(r"listen 80\b[^;]*;", f"listen 127.0.0.1:{srv.port};", text)
    return text


def tries(text):
    """(host, path) of each `# Try: curl http://HOST/PATH` line."""
    return re.findall(r"# Try: curl http://([^/\s]+)(/\S*)", text)


def test_every_example_shows_a_request():
    assert EXAMPLES
    for example in EXAMPLES:
        assert tries(example.read_text()), f"{example.name} has no '# Try: curl ...' line"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example(example):
    kind = example.name.split("-", 1)[0]
    if kind == "nginx" and not built("nginx", daemon=False):
        pytest.skip("the nginx module is not built")
    srv = SERVER_CLASS[kind]([], Settings())
    srv.settings.extra = localise(example.read_text(), srv)
    result = srv.configtest()
    assert result.returncode == 0, result.stdout + result.stderr
    with srv:
        for host, path in tries(example.read_text()):
            resp, data = srv.get(path, host=host)
            assert resp.status == 200, (host, path, resp.status, data[:300], srv.log_text()[-2000:])


# --- The README's blocks ---

README_BLOCKS = re.findall(r"^```(apache|nginx)\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def localise_readme(text, srv):
    """Points a README block's paths, user and port at this test server."""
    apps = srv.apps
    for placeholder, real in [("/srv/myapp/venv", VENV), ("/srv/shop/venv", VENV), ("/srv/api/venv", VENV),
                              ("/srv/api/main.py:app", f"{apps / 'asgi_apps.py'}:hello"), ("/srv/api", apps),
                              ("user=api", "user=www-data"),
                              ("/srv/myapp/wsgi.py", apps / "hello.py"),
                              ("/srv/shop/app.wsgi", apps / "hello.py"),
                              ("/srv/admin/app.py:app", f"{apps / 'battery.py'}:hello"),
                              ("/srv/myapp", apps),
                              ("/srv/admin", apps), ("/srv/shop", apps), ("user=shop", "user=www-data")]:
        text = text.replace(placeholder, str(real))
    text = text.replace("<VirtualHost *:80>", f"<VirtualHost 127.0.0.1:{srv.port}>")
    return re.sub(r"listen 80\b[^;]*;", f"listen 127.0.0.1:{srv.port};", text)


@pytest.mark.parametrize("kind,block", README_BLOCKS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(README_BLOCKS)])
def test_readme_block(kind, block):
    if kind == "nginx" and not built("nginx", daemon=False):
        pytest.skip("the nginx module is not built")
    srv = SERVER_CLASS[kind]([], Settings())
    # /srv/myapp/static is the application directory's static/, as in the README.
    static = srv.apps / "static"
    static.mkdir()
    (static / "site.css").write_text("body { color: teal }\n")
    srv.settings.extra = localise_readme(block, srv)
    if kind == "apache" and "Require ip" in block:
        # Debian's apache2 loads mod_authz_host by default; the test servers load only what they need.
        srv.settings.extra = f"LoadModule authz_host_module {APACHE_MODULES}/mod_authz_host.so\n{srv.settings.extra}"
    result = srv.configtest()
    assert result.returncode == 0, result.stdout + result.stderr
    hosts = re.findall(r"(?:ServerName|server_name) (\S+?);?$", block, re.M) or ["localhost"]
    mounts = re.findall(r"(?:GatewayScriptAlias|location) (/\S*)", block)
    with srv:
        for path in mounts:
            static_file = path == "/static/"
            resp, data = srv.get(path + "site.css" if static_file else path, host=hosts[0])
            assert resp.status == 200, (path, resp.status, data[:300], srv.log_text()[-2000:])
            assert data == b"body { color: teal }\n" if static_file else b"Hello" in data, data[:200]
        if "/srv/myapp/static/" in block:
            resp, data = srv.get("/static/site.css", host=hosts[0])
            assert resp.status == 200 and data == b"body { color: teal }\n", (resp.status, data[:200])
