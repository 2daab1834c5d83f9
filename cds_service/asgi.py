"""The ASGI application for uvicorn workers: `uvicorn cds_service.asgi:app` (configured from CDS_* variables)."""

from .app import create_app

app = create_app()
