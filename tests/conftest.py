"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Real data lives beside the checkout (../shared/data); WXSCALE_SHARED overrides it.
SHARED = Path(os.environ.get("WXSCALE_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real weather data; the test is skipped when it is absent."""
    folder = SHARED / "data"
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (set WXSCALE_SHARED to the folder holding data/)")
    return folder


@pytest.fixture(scope="session")
def ncep_air(shared_data: Path) -> Path:
    path = shared_data / "ncep_air_temperature_2013-2014.nc"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def shared_schemas() -> Path:
    folder = SHARED / "schemas"
    if not folder.is_dir():
        pytest.skip(f"schema folder {folder} is absent (set WXSCALE_SHARED to the folder holding schemas/)")
    return folder


@pytest.fixture(scope="module")
def moto_endpoint():
    """Yield the URL of a moto S3 server on 127.0.0.1, shared by the tests of one module."""
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
