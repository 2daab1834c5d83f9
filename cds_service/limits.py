"""Request body size limit as pure ASGI middleware: 413 with an OperationOutcome above the limit.

It also ends quietly a request whose client went away before its body was read (a dropped
connection, a malformed chunked body that uvicorn rejected): there is nobody to answer, so that is
an INFO line, not an "unexpected" error with a traceback that anyone can make the service log.
"""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect

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
