# The Python side of Gateway's ASGI runner, run on the event loop thread.
# The server side of receive() and send() is Rust (a Channel per request);
# this file holds what reads best as Python: the task around an application
# call, and the lifespan protocol.

import asyncio


async def serve(app, scope, receive, send, channel, lifespan):
    """Runs one request: after the application's lifespan startup, with a
    copy of its state; tells the channel how the application ended."""
    try:
        if not lifespan.started.done():
            await asyncio.shield(lifespan.started)
        if lifespan.failure is not None:
            channel.unavailable()
            return
        scope["state"] = lifespan.state.copy()
        await app(scope, receive, send)
    except BaseException as error:
        channel.raised(error)
    else:
        channel.returned()


class Lifespan:
    """The lifespan scope of one application in this process: startup before
    its first request, shutdown at process exit. An application that raises
    on the scope before completing startup is served without lifespan."""

    def __init__(self, app, name, report):
        loop = asyncio.get_running_loop()
        self.app = app
        self.name = name
        self.report = report
        self.state = {}
        self.failure = None
        self.supported = False
        self.stopping = False
        self.started = loop.create_future()
        self.stopped = loop.create_future()
        self.inbox = asyncio.Queue()
        self.inbox.put_nowait({"type": "lifespan.startup"})
        self.task = loop.create_task(self.run())

    async def run(self):
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "state": self.state,
        }
        try:
            await self.app(scope, self.receive, self.send)
        except BaseException as error:
            if not self.started.done():
                self.report("unsupported", self.name, error)
            elif self.stopping:
                self.report("shutdown-error", self.name, error)
        finally:
            _resolve(self.started)
            _resolve(self.stopped)

    async def receive(self):
        return await self.inbox.get()

    async def send(self, message):
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.supported = True
            _resolve(self.started)
        elif kind == "lifespan.startup.failed":
            self.failure = message.get("message") or "(no message)"
            self.report("startup-failed", self.name, self.failure)
            _resolve(self.started)
        elif kind == "lifespan.shutdown.complete":
            _resolve(self.stopped)
        elif kind == "lifespan.shutdown.failed":
            self.report("shutdown-failed", self.name, message.get("message") or "(no message)")
            _resolve(self.stopped)
        else:
            raise ValueError(f"unexpected ASGI lifespan message type {kind!r}")

    async def shutdown(self, timeout):
        if not self.supported or self.failure is not None or self.task.done():
            return
        self.stopping = True
        self.inbox.put_nowait({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(asyncio.shield(self.stopped), timeout)
        except asyncio.TimeoutError:
            self.report("shutdown-timeout", self.name, timeout)
            self.task.cancel()


def _resolve(future):
    if not future.done():
        future.set_result(None)


async def shutdown(lifespans, timeout):
    """Shuts the applications down, cancels what still runs, stops the loop."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.gather(*(l.shutdown(timeout) for l in lifespans), return_exceptions=True)
        me = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not me]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=1)
    finally:
        loop.stop()


def task_stack(task):
    """The stack of an application's task: each coroutine it awaits, down to
    the innermost (asyncio's own print_stack shows only the outermost)."""
    import traceback
    entries = []
    coro = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            entries.extend(traceback.extract_stack(frame, limit=1))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "Stack of the request's task (most recent call last):\n" + "".join(traceback.format_list(entries))
