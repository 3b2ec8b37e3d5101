"""The status page (issue 14): `SetHandler gateway-status` / `gateway_status;`, guarded by
the server's own access control, shows every process of the server (embedded) and of
each daemon group in HTML, `?json` and Prometheus text: the requests running now, the
requests by status class, a latency histogram, restarts by reason; counters outlive a
process that is recycled or killed."""

import os
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    APACHE_MODULES, VENV, Apache, Mount, Nginx, Settings, get_json, in_background, skip_unless_built, token,
)

STATUS = "/gateway-status"
DENIED = "/gateway-status-denied"
GROUP = "g"

APACHE_STATUS = f"""LoadModule authz_host_module {APACHE_MODULES}/mod_authz_host.so
<Location {STATUS}>
  SetHandler gateway-status
  Require ip 127.0.0.1
</Location>
<Location {DENIED}>
  SetHandler gateway-status
  Require ip 192.0.2.1
</Location>"""

COUNTERS_OFF = {"apache": "GatewayStatusCounters Off", "nginx": "gateway_status_counters off;"}


class StatusNginx(Nginx):
    """nginx with the status page in its default server, next to the first mount."""

    def location(self, m):
        loc = super().location(m)
        if m is self.mounts[0]:
            loc += (f"\n    location = {STATUS} {{ gateway_status; allow 127.0.0.1; deny all; }}"
                    f"\n    location = {DENIED} {{ gateway_status; allow 192.0.2.1; deny all; }}")
        return loc


def status_server(kind, mode, group_options="processes=2 threads=4", extra=""):
    """A server of `kind` with status_apps.py's callables mounted, run embedded or in daemon group 'g'."""
    skip_unless_built(kind, daemon=mode == "daemon")
    group = GROUP if mode == "daemon" else None
    mounts = [Mount(f"/{name}", "status_apps.py", name, mode=mode, group=group) for name in ("code", "boom", "slow")]
    if kind == "apache":
        srv = Apache(mounts, Settings(python_home=VENV, extra=f"{APACHE_STATUS}\n{extra}"))
    else:
        srv = StatusNginx(mounts, Settings(python_home=VENV, extra=extra), name="nginx-status")
    if mode == "daemon":
        srv.settings.daemons = {GROUP: f"python-home={VENV} {group_options}"}
    return srv


def status(srv):
    return get_json(srv, f"{STATUS}?json")


def section(doc, mode):
    """The embedded processes, or daemon group 'g', of a status document."""
    if mode == "embedded":
        return doc["embedded"]
    return next(g for g in doc["groups"] if g["name"] == GROUP)


def answer(srv, path):
    return srv.get(path)[0].status


def classes(**counts):
    return {c: counts.get(f"c{c}", 0) for c in ("1xx", "2xx", "3xx", "4xx", "5xx")}


def wait_for(what, timeout=15.0):
    """`what()` once it is true (not None, not False), or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"not seen within {timeout}s")


def counted(srv, mode, requests):
    """The section of `mode` once it has counted `requests` requests: a client may read
    its response a moment before the request ends on the server and is counted."""
    return wait_for(lambda: (now := section(status(srv), mode))["requests"] == requests and now)


def wait_for_marker(srv, name):
    path = srv.marker(name)
    return int(wait_for(lambda: path.exists() and path.read_text()))


BOTH = pytest.mark.parametrize("kind", ["apache", "nginx"])
MODES = pytest.mark.parametrize("mode", ["embedded", "daemon"])


@BOTH
@MODES
def test_json_shows_the_running_request_and_counts_each_class(kind, mode):
    with status_server(kind, mode) as srv:
        sent = [answer(srv, "/code") for _ in range(5)]
        sent += [answer(srv, "/code?code=404") for _ in range(3)]
        sent += [answer(srv, "/boom") for _ in range(2)]
        assert sent == [200] * 5 + [404] * 3 + [500] * 2
        counted(srv, mode, 10)
        tok = token()
        thread, results = in_background(srv, f"/slow?s=3&token={tok}")
        pid = wait_for_marker(srv, tok)
        time.sleep(0.3)
        now = section(status(srv), mode)
        process = next(p for p in now["processes"] if p["pid"] == pid)
        running = [c for c in process["current"] if c["uri"] == f"/slow?s=3&token={tok}"]
        assert len(running) == 1, process
        assert running[0]["method"] == "GET" and 0.2 <= running[0]["elapsed"] < 10, running
        assert process["busy_threads"] >= 1 and now["busy_threads"] >= 1, now
        assert now["status_classes"] == classes(c2xx=5, c4xx=3, c5xx=2), now
        assert now["requests"] == 10 and now["latency"]["count"] == 10, now
        assert now["latency"]["buckets"][-1] == {"le": "+Inf", "count": 10}, now
        thread.join()
        assert results[0][0] == 200
        done = counted(srv, mode, 11)
        assert done["status_classes"] == classes(c2xx=6, c4xx=3, c5xx=2), done
        assert not any(c["uri"].startswith("/slow") for p in done["processes"] for c in p["current"]), done
        assert done["latency"]["buckets"][-1]["count"] == 11
        # The slow request took 3 s: in no bucket up to 2.5 s.
        le = {b["le"]: b["count"] for b in done["latency"]["buckets"]}
        assert le["2.5"] == 10 and le["5.0"] == 11, le


def families(text):
    """Metric families by name (the parser drops a counter's _total)."""
    return {f.name.removesuffix("_total"): f for f in text_string_to_metric_families(text)}


def value(family, **labels):
    matching = [s.value for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (labels, family.samples)
    return matching[0]


@BOTH
@MODES
def test_prometheus_text_parses_by_query_and_by_accept_header(kind, mode):
    with status_server(kind, mode) as srv:
        assert [answer(srv, "/code") for _ in range(3)] + [answer(srv, "/code?code=404")] == [200, 200, 200, 404]
        where = {"mode": mode, "group": GROUP} if mode == "daemon" else {"mode": mode}
        counted(srv, mode, 4)
        for path, headers in ((f"{STATUS}?prometheus", {}), (STATUS, {"Accept": "text/plain; version=0.0.4"})):
            resp, data = srv.request("GET", path, headers=headers)
            assert resp.status == 200
            assert resp.getheader("Content-Type").startswith("text/plain; version=0.0.4"), resp.getheaders()
            found = families(data.decode())
            requests = found["gateway_requests"]
            assert requests.type == "counter"
            assert value(requests, **where, **{"class": "2xx"}) == 3
            assert value(requests, **where, **{"class": "4xx"}) == 1
            histogram = found["gateway_request_duration_seconds"]
            assert histogram.type == "histogram"
            assert value(histogram, **where, le="+Inf") == 4
            count = [s.value for s in histogram.samples
                     if s.name.endswith("_count") and s.labels == where]
            assert count == [4], histogram.samples
            assert value(found["gateway_processes"], **where) >= 1
            if mode == "daemon":
                assert value(found["gateway_restarts"], **where, reason="crash") == 0
                assert value(found["gateway_shed"], **where) == 0


@BOTH
def test_html_has_the_table_and_the_servers_access_control_applies(kind):
    with status_server(kind, "embedded") as srv:
        assert answer(srv, "/code") == 200
        counted(srv, "embedded", 1)
        resp, data = srv.get(STATUS)
        assert resp.status == 200
        assert resp.getheader("Content-Type").startswith("text/html")
        page = data.decode()
        assert "<table>" in page and "<th>pid</th>" in page and "<script" not in page, page
        assert "Requests: 1, 1xx: 0, 2xx: 1" in page, page
        denied, _ = srv.get(DENIED)
        assert denied.status == 403


@BOTH
def test_a_killed_daemon_process_counts_as_a_crash_and_its_requests_stay(kind):
    with status_server(kind, "daemon", "processes=1 threads=2") as srv:
        pids = {get_json(srv, "/code")["pid"] for _ in range(4)}
        assert len(pids) == 1
        victim = pids.pop()
        os.kill(victim, signal.SIGKILL)

        def replaced():
            g = section(status(srv), "daemon")
            ready = [p for p in g["processes"] if p["state"] == "ready" and p["pid"] != victim]
            return g if ready and g["restarts"]["crash"] == 1 else None

        g = wait_for(replaced)
        assert g["status_classes"] == classes(c2xx=4), g
        assert all(p["pid"] != victim for p in g["processes"]), g
        assert get_json(srv, "/code")["pid"] != victim
        counted(srv, "daemon", 5)


@BOTH
def test_max_requests_recycling_counts_its_reason_and_keeps_the_totals(kind):
    with status_server(kind, "daemon", "processes=1 threads=1 max-requests=3") as srv:
        # A process that drains may still serve a request already on its connection.
        pids = []
        while len(set(pids)) < 3 and len(pids) < 30:
            pids.append(get_json(srv, "/code")["pid"])
        assert len(set(pids)) == 3, pids
        counted(srv, "daemon", len(pids))
        g = wait_for(lambda: (g := section(status(srv), "daemon"))["restarts"]["max-requests"] >= 2 and g)
        assert g["restarts"]["crash"] == 0, g
        assert g["status_classes"] == classes(c2xx=len(pids)), g


def test_a_recycled_apache_child_keeps_its_totals():
    with status_server("apache", "embedded", extra="MaxConnectionsPerChild 3") as srv:
        pids = {get_json(srv, "/code")["pid"] for _ in range(15)}
        assert len(pids) > 2, pids
        now = counted(srv, "embedded", 15)
        assert now["status_classes"] == classes(c2xx=15), now
        alive = {p["pid"] for p in now["processes"]}
        assert pids - alive, "no child was recycled"


@BOTH
def test_counters_off_count_nothing(kind):
    with status_server(kind, "daemon", extra=COUNTERS_OFF[kind]) as srv:
        assert get_json(srv, "/code")["pid"]
        doc = status(srv)
        assert doc["embedded"] is None, doc
        g = section(doc, "daemon")
        assert g["counting"] is False and g["requests"] == 0, g
        assert len(g["processes"]) == 2, g
