"""The benchmark's baseline: a FastAPI app that reads the same request body and returns a fixed card.

Same framework, same server flags as the service: the difference in throughput is the CDS work.
"""

from fastapi import FastAPI, Request
from fastapi.responses import Response

FIXED = (
    b'{"cards":[{"uuid":"00000000-0000-0000-0000-000000000001","summary":"Lumbar imaging not recommended yet",'
    b'"indicator":"warning","source":{"label":"ACR Appropriateness Criteria"}}]}'
)

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@app.post("/cds-services/{service_id}")
async def service(service_id: str, request: Request) -> Response:
    await request.body()
    return Response(FIXED, media_type="application/json")


@app.get("/healthz")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
