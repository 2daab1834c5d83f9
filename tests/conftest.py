"""Fixtures shared by the test modules (helpers that are plain functions live in scenarios.py and server_support.py)."""

from __future__ import annotations

from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from cds_service.app import create_app
from cds_service.settings import Settings
from scenarios import TODAY


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    """The service in-process (fastapi's TestClient, lifespan included) on a fresh SQLite audit database, its
    date fixed to scenarios.TODAY. A module that needs other settings defines its own `client`."""
    database = tmp_path_factory.mktemp("service") / "audit.db"
    app = create_app(Settings.from_mapping({"CDS_DATABASE_URL": f"sqlite:///{database}", "CDS_TODAY": TODAY.isoformat()}))
    with TestClient(app) as test_client:
        yield test_client
