"""The local KServe v2 REST endpoint's server: aiohttp on a thread and event loop of its own.

Why this design (docs/protocol.md, "The local HTTP endpoint"):

- Every request goes through the agent's job path, not beside it: it is handed to the
  scheduler (`Scheduler.submit`) as the `Inbound` an MQTT client's message would be
  (exchange.py), with a Response Topic of its own under `$local/http/`
  (agent/local_replies.py). So batching, priorities, deadlines, the queue's bounds, the
  intake's refusals and the queries' answers (agent/queries.py) are the same code, and
  the answer is the same bytes the MQTT path would publish, handed to the waiting request
  instead of the broker: a camera process on the gateway needs no broker, and gets its
  answer while the broker is away.
- Durability: an inference request is journaled like any job, because admission is one
  path (one transaction per batch of arrivals, the disk-full rules, the queue's bounds)
  and a second, unjournaled admission would be a second place for each of those rules.
  What it does not get is a replay: an HTTP client that is gone (timed out, closed, or the
  agent restarted) cannot be answered later, so its reply topic is closed and a late
  answer dropped; the job's expiry is the request's timeout, so a journaled HTTP job
  recovered after a restart is answered DEADLINE_EXCEEDED (to nobody) instead of run. Each
  request has its own reply topic, so repeats are never de-duplicated across requests.
  Queries are answered by the intake, unjournaled, as over MQTT.
- The server's thread never runs a model nor touches the broker's socket; it only waits
  (asyncio) for the answer. The socket-owning MQTT thread is not involved at all.
- Limits: a body over jobs.max_message_bytes is refused 413 before it is read whole;
  `http.max_concurrent` requests at once (one more: 503 at once); `http.request_timeout_s`
  from the first byte to the answer (504); idle keep-alive connections close after
  `http.keepalive_s`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from edgeinfer.agent.config import HttpConfig, http_address
from edgeinfer.agent.http_endpoint.exchange import (
    JSON,
    STATUS,
    Reply,
    http_reply,
    infer_inbound,
    query_inbound,
)
from edgeinfer.agent.jobs import oversize_text
from edgeinfer.agent.local_replies import LocalReplies
from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.protocol import HEADER_LENGTH_PROPERTY, encode_error
from edgeinfer.contract.errors import Code
from edgeinfer.contract.queries import QueryKind

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
START_TIMEOUT_S = 10.0
# On the agent's stop (before the scheduler's): requests in hand get this long to be
# answered, then their connections are closed (aiohttp's graceful shutdown: measured, it
# waits this long twice, for the handlers and then the connections).
SHUTDOWN_S = 1.0
# The request's deadline on the monotonic clock, set by the bounds (each request is a task).
_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("http_request_deadline")


def _error(code: Code, text: str, status: int | None = None) -> web.Response:
    return web.Response(status=status or STATUS[code], body=encode_error(None, code, text),
                        content_type=JSON)


class HttpEndpoint:
    def __init__(self, cfg: HttpConfig, max_body: int, submit: Callable[[Inbound], None],
                 taking_jobs: Callable[[], bool], local: LocalReplies,
                 jobs_topic: str) -> None:
        """`submit`, `taking_jobs`: the scheduler's (neither blocks); `jobs_topic`: the
        topic an HTTP job is journaled under (the device's jobs topic)."""
        self._cfg = cfg
        self._host, self._port = http_address(cfg.listen)
        self._max_body = max_body
        self._submit = submit
        self._taking_jobs = taking_jobs
        self._local = local
        self._jobs_topic = jobs_topic
        self._active = 0  # requests being handled (this loop's thread only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None

    # --- lifecycle (the agent's thread) --------------------------------------------------

    def start(self) -> None:
        """Listen, or raise OSError (the address is taken, say)."""
        self._thread = threading.Thread(target=self._run, name="http-endpoint", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise OSError(f"the HTTP endpoint did not start within {START_TIMEOUT_S:g} s")
        if self._failed is not None:
            raise self._failed
        log.info("KServe v2 endpoint listening on http://%s", self._cfg.listen)

    def stop(self, timeout: float = 2 * SHUTDOWN_S + 3.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._listen())
        except BaseException as exc:  # handed to start()'s caller
            self._failed = exc
            self._ready.set()
            loop.close()
            return
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

    async def _listen(self) -> None:
        # The body's bound is checked from Content-Length first (_read_body); this one
        # stops a chunked body that runs over it.
        app = web.Application(client_max_size=self._max_body, middlewares=[self._bounds])
        model = "/v2/models/{model}"
        version = model + "/versions/{version}"
        app.router.add_get("/v2", self._server_metadata)
        app.router.add_get("/v2/health/live", self._server_live)
        app.router.add_get("/v2/health/ready", self._server_ready)
        for prefix in (model, version):
            app.router.add_get(prefix, self._model_metadata)
            app.router.add_get(prefix + "/ready", self._model_ready)
            app.router.add_post(prefix + "/infer", self._infer)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=SHUTDOWN_S,
                                     keepalive_timeout=self._cfg.keepalive_s)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    # --- the event loop's thread ---------------------------------------------------------

    @web.middleware
    async def _bounds(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """http.max_concurrent and http.request_timeout_s, for every route."""
        if self._active >= self._cfg.max_concurrent:
            return _error(Code.RESOURCE_EXHAUSTED, f"the agent's HTTP endpoint is handling "
                          f"{self._active} requests (http.max_concurrent); retry later")
        self._active += 1
        _deadline.set(time.monotonic() + self._cfg.request_timeout_s)  # this request's task
        try:
            async with asyncio.timeout(self._cfg.request_timeout_s):
                return await handler(request)
        except TimeoutError:
            return _error(Code.DEADLINE_EXCEEDED, "no answer within the endpoint's "
                          f"{self._cfg.request_timeout_s:g} s (http.request_timeout_s)")
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(request.content_length)
        finally:
            self._active -= 1

    def _too_large(self, size: int | None) -> web.Response:
        text = (oversize_text(size, self._max_body) if size is not None else
                f"the request's body is over this agent's limit of {self._max_body} bytes "
                "(jobs.max_message_bytes)")
        return _error(Code.INVALID_ARGUMENT, text, status=413)

    async def _ask(self, inbound_for: Callable[[str], Inbound]) -> web.Response:
        """Hand the request to the job path and wait for what it would have published."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[bytes, tuple[tuple[str, str], ...]]] = loop.create_future()

        def settle(payload: bytes, props: tuple[tuple[str, str], ...]) -> None:
            if not answer.done():
                answer.set_result((payload, props))

        def deliver(payload: bytes, props: tuple[tuple[str, str], ...]) -> None:
            loop.call_soon_threadsafe(settle, payload, props)  # any thread; never blocks

        reply_topic = self._local.open(deliver)
        try:
            self._submit(inbound_for(reply_topic))
            reply: Reply = http_reply(*await answer)
        finally:
            self._local.close(reply_topic)
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)

    async def _query(self, kind: QueryKind, request: web.Request) -> web.Response:
        info = request.match_info
        model, version = info.get("model"), info.get("version")
        return await self._ask(lambda reply_topic: query_inbound(
            self._jobs_topic, reply_topic, kind, model, version))

    async def _server_live(self, request: web.Request) -> web.Response:
        return await self._query(QueryKind.SERVER_LIVE, request)

    async def _server_ready(self, request: web.Request) -> web.Response:
        return await self._query(QueryKind.SERVER_READY, request)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return await self._query(QueryKind.SERVER_METADATA, request)

    async def _model_ready(self, request: web.Request) -> web.Response:
        return await self._query(QueryKind.MODEL_READY, request)

    async def _model_metadata(self, request: web.Request) -> web.Response:
        return await self._query(QueryKind.MODEL_METADATA, request)

    async def _infer(self, request: web.Request) -> web.Response:
        if not self._taking_jobs():
            # Draining before a stop: an MQTT job is left with the broker for the next
            # start, which an HTTP request cannot be; it is told at once instead.
            return _error(Code.UNAVAILABLE, "the agent is stopping and takes no new jobs; "
                          "retry after it restarts")
        size = request.content_length
        if size is not None and size > self._max_body:
            return self._too_large(size)
        body = await request.read()
        header_length = request.headers.get(HEADER_LENGTH_PROPERTY)
        model, version = request.match_info["model"], request.match_info.get("version")
        left = _deadline.get() - time.monotonic()
        return await self._ask(lambda reply_topic: infer_inbound(
            self._jobs_topic, reply_topic, model, version, body, header_length, left))


__all__ = ["HttpEndpoint"]
