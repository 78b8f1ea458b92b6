"""Operator authentication on the HTTP API: bearer tokens, roles, scopes, and
where the API may listen without them. The real service, real agents over
QUIC, a real HTTP/1.1 client; every answer checked against the OpenAPI document.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path

import pytest
import trio

from trio_quiccmd.config import ServerSettings
from trio_quiccmd.server.service import StartupError, serve
from trio_quiccmd.tokens import issue_api_token

from .httpclient import check_openapi, http
from .processes import spawn
from .test_http_api import TEST_TIMEOUT, running_server


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def assert_error(response, status: int, code: str, document: dict, method: str, path: str) -> str:
    assert response.status == status, (response.status, response.body[:300])
    assert response.json()["error"]["code"] == code
    check_openapi(document, method, path, response)
    return response.json()["error"]["message"]


async def test_loopback_needs_no_token_by_default_but_a_wrong_one_is_401(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="trio_quiccmd.http")
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            await h.send(200, client_id="a", command_type="echo", wait=True)
            assert (await h.request("GET", "/api/commands")).status == 200
            # A token that is given is checked, needed or not: never silently anonymous.
            wrong = await h.request("GET", "/api/commands", headers=bearer("qco_nope"))
            assert_error(wrong, 401, "unauthorized", h.document, "GET", "/api/commands")
            assert wrong.headers["www-authenticate"] == 'Bearer realm="quiccmd", error="invalid_token"'
            not_bearer = await h.request("GET", "/api/clients", headers=[("Authorization", "Basic YTpi")])
            assert_error(not_bearer, 401, "unauthorized", h.document, "GET", "/api/clients")
    rejected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Operator rejected ")]
    assert len(rejected) == 2
    assert "method=GET path=/api/commands reason='invalid bearer token'" in rejected[0]


async def test_require_api_token_on_loopback_and_the_two_roles(tmp_path):
    data = tmp_path / "data"
    reader = issue_api_token(data, "reader", role="read")
    operator = issue_api_token(data, "operator", role="operate")
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, require_api_token=True) as h:
            await h.start_agent("a")
            # No token: 401 everywhere but /healthz and /openapi.json.
            for method, target, path in [
                ("GET", "/api/commands", "/api/commands"),
                ("GET", "/api/clients", "/api/clients"),
                ("GET", "/api/audit", "/api/audit"),
                ("GET", "/metrics", "/metrics"),
                ("GET", "/api/command/x", "/api/command/{command_id}"),
                ("POST", "/api/command/x/cancel", "/api/command/{command_id}/cancel"),
            ]:
                response = await h.request(method, target)
                message = assert_error(response, 401, "unauthorized", h.document, method, path)
                assert "bearer token is required" in message
                assert response.headers["www-authenticate"] == 'Bearer realm="quiccmd"'
            anonymous_send = await h.request("POST", "/api/command", {"client_id": "a", "command_type": "echo"})
            assert_error(anonymous_send, 401, "unauthorized", h.document, "POST", "/api/command")
            assert (await h.request("GET", "/healthz")).status == 200
            assert (await h.request("GET", "/openapi.json")).status == 200

            # read: every GET, but not send or cancel.
            for target in ["/api/commands", "/api/clients", "/api/audit", "/metrics"]:
                response = await h.request("GET", target, headers=bearer(reader))
                assert response.status == 200, (target, response.body)
            refused = await h.request(
                "POST", "/api/command", {"client_id": "a", "command_type": "echo"}, headers=bearer(reader)
            )
            message = assert_error(refused, 403, "forbidden", h.document, "POST", "/api/command")
            assert message == "token reader has role read; POST /api/command needs role operate"

            # operate: everything.
            sent = await h.request(
                "POST", "/api/command",
                {"client_id": "a", "command_type": "gate", "payload": {"name": "g"}},
                headers=bearer(operator),
            )
            assert sent.status == 202
            command_id = sent.json()["command_id"]
            cancel_path = "/api/command/{command_id}/cancel"
            refused = await h.request("POST", f"/api/command/{command_id}/cancel", headers=bearer(reader))
            assert_error(refused, 403, "forbidden", h.document, "POST", cancel_path)
            cancelled = await h.request("POST", f"/api/command/{command_id}/cancel", headers=bearer(operator))
            assert cancelled.status == 200 and cancelled.json()["status"] == "cancelled"


async def test_a_token_restricted_to_command_types_and_agent_labels(tmp_path):
    data = tmp_path / "data"
    web_echo = issue_api_token(data, "web-echo", role="operate", command_types=("echo", "gate"), labels={"role": "web"})
    admin = issue_api_token(data, "admin", role="operate")
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, require_api_token=True) as h:
            await h.start_agent("web-1", labels={"role": "web"})
            await h.start_agent("db-1", labels={"role": "db"})

            async def send(token: str, **fields) -> object:
                return await h.request("POST", "/api/command", fields, headers=bearer(token))

            ok = await send(web_echo, client_id="web-1", command_type="echo", wait=True)
            assert ok.status == 200 and ok.json()["status"] == "completed"

            wrong_type = await send(web_echo, client_id="web-1", command_type="sleep", payload={"seconds": 0})
            message = assert_error(wrong_type, 403, "forbidden", h.document, "POST", "/api/command")
            assert message == "token web-echo may not use command type 'sleep' (allowed: echo, gate)"

            wrong_agent = await send(web_echo, client_id="db-1", command_type="echo")
            message = assert_error(wrong_agent, 403, "forbidden", h.document, "POST", "/api/command")
            assert message == "token web-echo may only command agents labelled role=web; agent db-1 is not"

            # An agent the server cannot vouch for (offline, no labels bound) is refused: fail closed.
            unknown = await send(web_echo, client_id="ghost", command_type="echo", connect_timeout=5)
            message = assert_error(unknown, 403, "forbidden", h.document, "POST", "/api/command")
            assert "labels are unknown" in message

            # Cancelling is scoped the same way.
            other = await send(admin, client_id="db-1", command_type="gate", payload={"name": "d"})
            assert other.status == 202
            command_id = other.json()["command_id"]
            refused = await h.request("POST", f"/api/command/{command_id}/cancel", headers=bearer(web_echo))
            assert_error(refused, 403, "forbidden", h.document, "POST", "/api/command/{command_id}/cancel")

            # Nothing refused was created.
            listed = await h.request("GET", "/api/commands", headers=bearer(admin))
            assert sorted(c["command_type"] for c in listed.json()["commands"]) == ["echo", "gate"]
            assert (await h.request("POST", f"/api/command/{command_id}/cancel", headers=bearer(admin))).status == 200

            # Rotated, the token keeps its role and scope: a new secret, not an unrestricted one.
            rotated = issue_api_token(data, "web-echo", replace=True)
            assert (await send(web_echo, client_id="web-1", command_type="echo")).status == 401
            wrong_type = await send(rotated, client_id="web-1", command_type="sleep", payload={"seconds": 0})
            assert_error(wrong_type, 403, "forbidden", h.document, "POST", "/api/command")
            wrong_agent = await send(rotated, client_id="db-1", command_type="echo")
            assert_error(wrong_agent, 403, "forbidden", h.document, "POST", "/api/command")
            ok = await send(rotated, client_id="web-1", command_type="echo", wait=True)
            assert ok.status == 200 and ok.json()["status"] == "completed"


def settings_on(tmp_path: Path, host: str, **overrides) -> ServerSettings:
    return ServerSettings(
        http_host=host, http_port=0, quic_host="127.0.0.1", quic_port=0,
        data_dir=tmp_path / "data", shutdown_grace=0.0, **overrides,
    )


async def test_off_loopback_the_server_refuses_to_start_without_a_token(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        with pytest.raises(StartupError) as info:
            await serve(settings_on(tmp_path, "0.0.0.0"))
        assert str(info.value).startswith(
            "the HTTP API would listen on 0.0.0.0, which is not loopback, and no API token exists"
        )
        # Refused before it wrote anything (no certificate, no credential).
        assert not (tmp_path / "data").exists()
        # The same with require_api_token on loopback and no token to require.
        with pytest.raises(StartupError, match="require_api_token is set but no API token exists"):
            await serve(settings_on(tmp_path, "127.0.0.1", require_api_token=True))


@pytest.mark.parametrize("with_token", [True, False])
async def test_off_loopback_with_a_token_it_is_required_and_explicit_consent_opens_it(tmp_path, with_token):
    if with_token:
        token = issue_api_token(tmp_path / "data", "ops", role="operate")
        settings = settings_on(tmp_path, "0.0.0.0")
    else:
        settings = settings_on(tmp_path, "0.0.0.0", allow_unauthenticated_http=True)
    shutdown = trio.Event()
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(lambda task_status: serve(settings, shutdown_event=shutdown, task_status=task_status))
            address = ("127.0.0.1", addresses.http[1])
            anonymous = await http(address, "GET", "/api/clients")
            if with_token:
                assert anonymous.status == 401
                assert (await http(address, "GET", "/api/clients", headers=bearer(token))).status == 200
            else:
                assert anonymous.status == 200
                # Open only while there is no token to require: the first one closes it.
                token = issue_api_token(tmp_path / "data", "ops", role="operate")
                closed = await http(address, "GET", "/api/clients")
                assert closed.status == 401
                assert "API tokens exist" in closed.json()["error"]["message"]
                assert (await http(address, "GET", "/api/clients", headers=bearer(token))).status == 200
            shutdown.set()


async def test_tokens_without_require_api_token_are_a_startup_warning(tmp_path, caplog):
    # Behind a reverse proxy on the same host every request comes from loopback:
    # anonymous would be everyone. Tokens exist, so the operator meant to use them.
    caplog.set_level(logging.WARNING, logger="trio_quiccmd.server")
    issue_api_token(tmp_path / "data", "ops", role="operate")
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path):
            pass
    warnings = [r.getMessage() for r in caplog.records if "HTTP API does not require a token" in r.getMessage()]
    assert len(warnings) == 1 and "set require_api_token = true" in warnings[0]
    caplog.clear()
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, require_api_token=True):
            pass
    assert not [r for r in caplog.records if "HTTP API does not require a token" in r.getMessage()]


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_the_cli_refuses_a_public_bind_without_tokens_in_one_line(tmp_path):
    with trio.fail_after(30):
        async with spawn(
            [sys.executable, "-m", "trio_quiccmd.server", "--http", f"0.0.0.0:{_free_tcp_port()}",
             "--quic", "127.0.0.1:0"],
            cwd=tmp_path, name="server",
        ) as server:
            assert await server.process.wait() == 1
            await server.stderr.closed.wait()
    errors = server.stderr.matching("error:")
    assert errors == [
        "python -m trio_quiccmd.server: error: the HTTP API would listen on 0.0.0.0, which is not "
        "loopback, and no API token exists: create one (python -m trio_quiccmd.server api-token "
        "create NAME --role operate) or pass --allow-unauthenticated-http"
    ], str(server.stderr)
    assert not server.stderr.matching("Traceback")


async def test_a_web_page_cannot_drive_the_loopback_api(tmp_path, caplog):
    """CSRF and DNS rebinding: a browser on the server's host reaches 127.0.0.1
    too. A text/plain body is 415; a request without a token whose Host or
    Origin is not this API's loopback address is 403, logged and audited; a
    request with a valid token is unaffected."""
    caplog.set_level(logging.WARNING, logger="trio_quiccmd.http")
    data = tmp_path / "data"
    token = issue_api_token(data, "ops", role="operate")
    send_fields = {"client_id": "web-1", "command_type": "echo", "payload": {"x": 1}, "connect_timeout": 3600}
    raw = json.dumps(send_fields).encode()
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            port = h.http_address[1]
            doc = h.document
            # The review's curl: a cross-site "simple" request, text/plain body.
            csrf = await h.request(
                "POST", "/api/command", body=raw,
                headers=[("Content-Type", "text/plain"), ("Origin", "http://evil.example"),
                         ("Host", "evil.example:1234")],
            )
            assert_error(csrf, 403, "forbidden", doc, "POST", "/api/command")
            # Each defence on its own.
            text_plain = await h.request("POST", "/api/command", body=raw, headers=[("Content-Type", "text/plain")])
            message = assert_error(text_plain, 415, "unsupported_media_type", doc, "POST", "/api/command")
            assert "application/json" in message
            no_type = await h.request("POST", "/api/command", body=raw, headers=[("Content-Type", "")])
            assert_error(no_type, 415, "unsupported_media_type", doc, "POST", "/api/command")
            form = await h.request(
                "POST", "/api/command/x/cancel", body=b"reason=x",
                headers=[("Content-Type", "application/x-www-form-urlencoded")],
            )
            assert_error(form, 415, "unsupported_media_type", doc, "POST", "/api/command/{command_id}/cancel")
            charset = await h.request(
                "POST", "/api/command", body=raw, headers=[("Content-Type", "application/json; charset=utf-8")]
            )
            assert charset.status == 202, charset.body

            rebound = await h.request("POST", "/api/command", send_fields, headers=[("Host", f"evil.example:{port}")])
            message = assert_error(rebound, 403, "forbidden", doc, "POST", "/api/command")
            assert "send a bearer token" in message
            read = await h.request("GET", "/api/commands", headers=[("Host", f"evil.example:{port}")])
            assert_error(read, 403, "forbidden", doc, "GET", "/api/commands")
            for origin in ["http://evil.example", "null", f"http://localhost:{port + 1}"]:
                cross = await h.request("POST", "/api/command", send_fields, headers=[("Origin", origin)])
                assert_error(cross, 403, "forbidden", doc, "POST", "/api/command")

            # Allowed: loopback names and addresses, and a page of the API's own origin.
            for host in [f"localhost:{port}", f"127.0.0.1:{port}", f"127.1.2.3:{port}"]:
                fine = await h.request("GET", "/api/commands", headers=[("Host", host)])
                assert fine.status == 200, (host, fine.body)
            same_origin = await h.request(
                "GET", "/api/commands", headers=[("Origin", f"http://localhost:{port}")]
            )
            assert same_origin.status == 200
            # A valid token is not affected: browsers do not attach it cross-site.
            with_token = await h.request(
                "POST", "/api/command", send_fields,
                headers=[*bearer(token), ("Host", f"evil.example:{port}"), ("Origin", "http://evil.example")],
            )
            assert with_token.status == 202, with_token.body

            audit = (await h.request("GET", "/api/audit?outcome=refused")).json()["entries"]
            refused_anonymously = [e for e in audit if e["actor"] == "anonymous" and e["error_code"] == "forbidden"]
            assert len(refused_anonymously) == 5  # the curl, the rebound POST, the three cross-origin ones
    rejected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Operator rejected ")]
    assert len(rejected) >= 5
    assert any("path=/api/commands" in line and "Host 'evil.example" in line for line in rejected)


def test_anonymous_origin_rules():
    from trio_quiccmd.server.http_api import anonymous_origin_refusal as refusal

    assert refusal("localhost:8080", None, "127.0.0.1") is None
    assert refusal("[::1]:8080", "http://[::1]:8080", "::1") is None
    assert refusal("LOCALHOST:8080", "http://localhost:8080", None) is None
    assert refusal("10.0.0.5:8080", None, "10.0.0.5") is None  # exactly the bind address
    assert refusal("10.0.0.5:8080", None, "0.0.0.0") is not None
    assert refusal("0.0.0.0:8080", None, "0.0.0.0") is not None
    assert refusal("evil.example", None, "127.0.0.1") is not None
    assert refusal(None, None, "127.0.0.1") is not None
    assert refusal("localhost:8080@evil", None, None) is not None
    assert refusal("localhost", "http://localhost", None) is None  # port 80 both
    assert refusal("localhost:8080", "https://localhost:8080", None) is None
    assert refusal("localhost:8080", "http://localhost", None) is not None
    assert refusal("localhost:8080", "file://", None) is not None
