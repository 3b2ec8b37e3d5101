"""Every example in conf/ works: with its paths pointed at the test apps it
passes the server's configuration test and serves the request its `# Try:`
line shows."""

import re

import pytest
from conftest import VENV
from harness import MODULES, ROOT, Apache, Nginx, Settings

EXAMPLES = sorted((ROOT / "conf").glob("*.conf"))


def localise(text, srv):
    """Points an example's /srv paths and port 80 at this test server."""
    apps = srv.apps
    for placeholder, real in [("/srv/venv", VENV), ("/srv/hello/wsgi.py", apps / "hello.py"),
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


SERVERS = {"apache": Apache, "nginx": Nginx}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example(example):
    kind = example.name.split("-", 1)[0]
    if kind == "nginx" and not (MODULES / "ngx_http_gateway_module.so").exists():
        pytest.skip("the nginx module is not built")
    srv = SERVERS[kind]([], Settings())
    srv.settings.extra = localise(example.read_text(), srv)
    result = srv.configtest()
    assert result.returncode == 0, result.stdout + result.stderr
    with srv:
        for host, path in tries(example.read_text()):
            resp, data = srv.get(path, host=host)
            assert resp.status == 200, (host, path, resp.status, data[:300], srv.log_text()[-2000:])
