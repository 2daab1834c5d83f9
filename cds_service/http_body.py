"""Reading an outgoing request's response body under a size cap (the JWKS fetch, the FHIR fallback client)."""

from __future__ import annotations

import httpx


async def read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The streamed response's body; None as soon as it says or proves to be larger than `limit` bytes."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
