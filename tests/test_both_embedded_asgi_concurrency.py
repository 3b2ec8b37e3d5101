"""Embedded ASGI concurrency: a request awaiting I/O holds no thread. One nginx
worker with two module threads serves 500 requests that each await
asyncio.sleep(1) in about a second; under Apache the MPM's workers bound how many
run at once, as for every handler, and those run together on the child's loop."""

import asyncio
import os
import threading
import time

import pytest

from harness import Apache, Mount, Nginx, battery_settings, built, get_json

SLEEP = Mount("/sleep", "asgi_apps.py", "sleep", interface="asgi")


async def _get(port, path):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


def concurrent_gets(port, path, count, timeout=60.0):
    """`count` requests at once, each on its own connection: (responses, seconds)."""
    async def run():
        return await asyncio.wait_for(asyncio.gather(*(_get(port, path) for _ in range(count))), timeout)

    start = time.monotonic()
    responses = asyncio.run(run())
    return responses, time.monotonic() - start


def threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.skipif(not built("nginx", daemon=False), reason="ngx_http_gateway_module.so is not built")
def test_one_nginx_worker_awaits_500_sleeps_at_once():
    srv = Nginx([SLEEP], battery_settings(), workers=1, threads=2)
    with srv:
        (worker,) = srv.children()
        assert get_json(srv, "/sleep?s=0")["pid"] == worker  # the application is loaded
        threads_before = threads_of(worker)
        outcome = []
        client = threading.Thread(target=lambda: outcome.append(concurrent_gets(srv.port, "/sleep?s=1", 500)))
        client.start()
        time.sleep(0.6)  # every request is in, awaiting its sleep
        threads_during = threads_of(worker)
        client.join(timeout=60)
        responses, seconds = outcome[0]
        assert all(r.startswith(b"HTTP/1.1 200") for r in responses), \
            [r[:200] for r in responses if not r.startswith(b"HTTP/1.1 200")][:3]
        assert seconds < 3.0, f"500 concurrent 1 s sleeps took {seconds:.2f}s"
        # No thread per request: the worker has about as many threads as before.
        assert threads_during <= threads_before + 2, (threads_before, threads_during)


@pytest.mark.skipif(not built("apache", daemon=False), reason="mod_gateway.so is not built")
@pytest.mark.parametrize("mpm,workers", [("event", 16), ("prefork", 6)])
def test_apache_runs_as_many_sleeps_at_once_as_it_has_workers(mpm, workers):
    """Twice as many 1 s sleeps as the MPM has workers take about two seconds,
    not one per request."""
    srv = Apache([SLEEP], battery_settings(), mpm=mpm)
    with srv:
        for _ in range(4):
            get_json(srv, "/sleep?s=0")
        responses, seconds = concurrent_gets(srv.port, "/sleep?s=1", 2 * workers)
        assert all(r.startswith(b"HTTP/1.1 200") for r in responses), [r[:200] for r in responses][:3]
        assert seconds < 6.0, f"{2 * workers} concurrent 1 s sleeps with {workers} workers took {seconds:.2f}s"
