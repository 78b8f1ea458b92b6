"""The served OpenAPI document against the real server: schemathesis
generates requests from it (valid and invalid) and checks that the server
never answers 5xx and that every response matches the document."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    directory = tmp_path_factory.mktemp("schemathesis")
    http_port = _free_port(socket.SOCK_STREAM)
    server = subprocess.Popen(
        [
            sys.executable, "-m", "trio_quiccmd.server",
            "--http", f"127.0.0.1:{http_port}",
            "--quic", f"127.0.0.1:{_free_port(socket.SOCK_DGRAM)}",
            "--log-level", "WARNING",
            "--max-payload-bytes", "65536",
            "--shutdown-grace", "0.5",
            # Generated commands may wait for an agent that never comes: keep it short.
            "--max-timeout", "1", "--default-timeout", "1",
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # a subprocess has no event to wait on; poll its health, bounded
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.1)
        yield schemathesis.openapi.from_url(base + "/openapi.json")
    finally:
        server.terminate()
        assert server.wait(20) == 0
        errors = server.stderr.read().decode()
        assert "Traceback" not in errors, errors


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_response_matches_the_document(case):
    case.call_and_validate()
