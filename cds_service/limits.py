"""Request body size limit as pure ASGI middleware: 413 with an OperationOutcome above the limit.

It also ends quietly a request whose client went away before its body was read (a dropped
connection, a malformed chunked body that uvicorn rejected): there is nobody to answer, so that is
an INFO line, not an "unexpected" error with a traceback that anyone can make the service log.
"""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .protocol import encode, operation_outcome

log = logging.getLogger("cds_service")


class BodyTooLarge(Exception):
    pass


class _ResponseTracker:
    """Wraps `send` and remembers whether the response has started (then nothing else may be sent)."""

    def __init__(self, send):
        self._send = send
        self.started = False

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


async def _send_json(send, status: int, outcome: dict) -> None:
    body = encode(outcome)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
        received = 0
        disconnected = False
        response = _ResponseTracker(send)

        async def limited_receive():
            nonlocal received, disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            elif message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, response)
        except BodyTooLarge:
            if not response.started:
                await self._reject(send)
        except ClientDisconnect:
            if not disconnected:
                raise
            log.info("%s %s: the client disconnected before sending the whole body", scope.get("method"), scope.get("path"))

    async def _reject(self, send):
        await _send_json(send, 413, operation_outcome(f"The request body is larger than {self.max_bytes} bytes.", code="too-costly"))


class ErrorContainment:
    """A fault in a route becomes a generic JSON 500 here, inside the CORS middleware, so a browser
    client can read it; the log names the exception class only (no request content, no PHI)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = _ResponseTracker(send)
        try:
            await self.app(scope, receive, response)
        except (BodyTooLarge, ClientDisconnect):
            raise
        except Exception as exc:  # noqa: BLE001 - the edge of the service: answer, never crash
            log.error("unexpected %s on %s %s", type(exc).__name__, scope.get("method"), scope.get("path"))
            if not response.started:
                await _send_json(send, 500, operation_outcome("Internal error; the request was not processed.", code="exception"))


# -- slow and idle connections ------------------------------------------------------------------------------

HEADER_TIMEOUT_S = 5.0  # a connection must send its request headers within this (uvicorn's keep-alive is 5 s too)
BODY_TIMEOUT_S = 30.0  # ... and the whole body within this after the headers (5 MB at a slow 170 KB/s)


class ReadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with request read timeouts, for `python -m cds_service serve`.

    uvicorn counts every open connection against limit_concurrency but times a connection out only after a
    response: 200 sockets that send nothing (or half a request) would hold every slot and make all other
    callers' answers 503 for as long as they stay open. Here a connection that has not sent its headers within
    HEADER_TIMEOUT_S, or its body within BODY_TIMEOUT_S of them, is closed. (A reverse proxy with header and
    body timeouts is still the production set-up.)"""

    _read_timer = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _too_slow(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            log.info("connection closed: request not received within the read timeout")
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(HEADER_TIMEOUT_S)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._read_timer is None:  # the next request on a kept-alive connection
            self._arm(HEADER_TIMEOUT_S)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(BODY_TIMEOUT_S)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
