"""The HTTP API end to end: the real service (``serve``) on free ports, real
agents over QUIC with TLS verified, and a real HTTP/1.1 client over TCP.

Synchronisation is by events, never by sleeping: a "gate" command type on the
agent signals when it starts and waits until the test opens it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import attrs
import h11
import pytest
import trio

from .httpclient import NO_BODY, HttpResponse, check_openapi, http, read_response, samples
from trio_quiccmd import Agent, builtin_executor
from trio_quiccmd.config import ServerSettings
from trio_quiccmd.errors import InvalidPayload, PolicyDenied, StoreUnavailable
from trio_quiccmd.model import Command, CommandStatus, ErrorCode, transition
from trio_quiccmd.server import http_api, service
from trio_quiccmd.server.http_api import rfc3339
from trio_quiccmd.server.openapi import openapi_document
from trio_quiccmd.server.service import ServerAddresses, serve
from trio_quiccmd.server.store import MemoryStore, Store
from trio_quiccmd.tokens import DEV_AGENT_TOKEN_FILE, issue_api_token, read_token_file

pytestmark = pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")

#: Every test ends well within this, or it hangs somewhere.
TEST_TIMEOUT = 20

COMMAND_FIELDS = [
    "command_id", "client_id", "command_type", "payload", "status", "result", "error",
    "error_code", "priority", "timeout", "connect_timeout", "created_at", "sent_at",
    "completed_at",
]


# -- the gate executor: commands the test starts and finishes ------------------------


class Gates:
    """``gate`` commands (payload ``{"name": ...}``) run until the test opens their gate."""

    def __init__(self) -> None:
        self.started: dict[str, trio.Event] = defaultdict(trio.Event)
        self.opened: dict[str, trio.Event] = defaultdict(trio.Event)
        self.cancelled: dict[str, trio.Event] = defaultdict(trio.Event)

    def executor(self):
        registry = builtin_executor()

        @registry.register("gate")
        async def gate(payload: Any) -> Any:
            name = payload["name"]
            self.started[name].set()
            try:
                await self.opened[name].wait()
            except trio.Cancelled:
                self.cancelled[name].set()
                raise
            return {"opened": name}

        @registry.register("lone_surrogate")
        async def lone_surrogate(payload: Any) -> Any:
            return {"text": "x\ud800"}

        @registry.register("not_a_number")
        async def not_a_number(payload: Any) -> Any:
            return {"value": float("nan"), "big": float("inf"), "ok": 1.5}

        return registry


# -- the harness: the real service in a nursery ----------------------------------------


@attrs.define
class Harness:
    settings: ServerSettings
    addresses: ServerAddresses
    shutdown: trio.Event
    agents_nursery: trio.Nursery
    gates: Gates
    document: dict
    served: trio.Event

    @property
    def http_address(self) -> tuple[str, int]:
        return self.addresses.http

    async def request(self, method: str, target: str, json_body: Any = NO_BODY, **kw: Any) -> HttpResponse:
        return await http(self.http_address, method, target, json_body, **kw)

    async def start_agent(self, client_id: str, **options: Any) -> Agent:
        """A real agent; returns once the server has welcomed it."""
        options.setdefault("executor", self.gates.executor())
        options.setdefault("ca_file", self.settings.data_dir / "server-cert.pem")
        # The development credential serve() writes, as an agent started from
        # the same directory finds it.
        options.setdefault("token", read_token_file(self.settings.data_dir / DEV_AGENT_TOKEN_FILE))
        options.setdefault("reconnect_initial_delay", 0.05)
        options.setdefault("reconnect_max_delay", 0.2)
        agent = Agent(client_id, ("127.0.0.1", self.addresses.quic[1]), **options)
        await self.agents_nursery.start(agent.run)
        return agent

    async def send(self, expect: int | None = 202, **fields: Any) -> dict:
        response = await self.request("POST", "/api/command", fields)
        if expect is not None:
            assert response.status == expect, response.body
        check_openapi(self.document, "POST", "/api/command", response)
        return response.json()


@asynccontextmanager
async def running_server(
    tmp_path: Path, *, command_store: Store | None = None, **overrides: Any
) -> AsyncIterator[Harness]:
    overrides.setdefault("shutdown_grace", 0.0)
    settings = ServerSettings(
        http_host="127.0.0.1",
        http_port=0,
        quic_host="127.0.0.1",
        quic_port=0,
        data_dir=tmp_path / "data",
        **overrides,
    )
    shutdown = trio.Event()
    served = trio.Event()

    async def run_service(task_status=trio.TASK_STATUS_IGNORED) -> None:
        await serve(settings, shutdown_event=shutdown, task_status=task_status, store=command_store)
        served.set()

    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(run_service)
        async with trio.open_nursery() as agents:
            harness = Harness(
                settings, addresses, shutdown, agents, Gates(),
                openapi_document(
                    default_timeout=settings.default_timeout,
                    max_timeout=settings.max_timeout,
                    max_payload_bytes=settings.max_payload_bytes,
                ),
                served,
            )
            yield harness
            # Agents first: after the server is gone they would only retry.
            agents.cancel_scope.cancel()
        shutdown.set()
    # The nursery only closes once serve() returned: nothing left running.
    assert served.is_set()


# -- sending, getting, waiting -----------------------------------------------------------


async def test_send_then_get_and_long_poll_to_completion(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("client-001")
            sent = await h.send(client_id="client-001", command_type="gate", payload={"name": "g"})
            assert list(sent) == COMMAND_FIELDS
            assert sent["status"] == "executing"
            assert sent["payload"] == {"name": "g"}
            assert sent["timeout"] == 30 and sent["connect_timeout"] == 0 and sent["priority"] == 0
            assert sent["sent_at"] is not None and sent["completed_at"] is None
            await h.gates.started["g"].wait()

            url = f"/api/command/{sent['command_id']}"
            now = await h.request("GET", url)
            assert now.status == 200 and now.json()["status"] == "executing"
            check_openapi(h.document, "GET", "/api/command/{command_id}", now)

            # A long poll that runs out returns the current state, after the wait.
            start = trio.current_time()
            short = await h.request("GET", url + "?wait=0.2")
            assert trio.current_time() - start >= 0.2
            assert short.status == 200 and short.json()["status"] == "executing"

            # A long poll returns as soon as the command finishes, well before its wait.
            async with trio.open_nursery() as nursery:
                results: list[HttpResponse] = []

                async def poll() -> None:
                    results.append(await h.request("GET", url + "?wait=60"))

                nursery.start_soon(poll)
                h.gates.opened["g"].set()
            final = results[0].json()
            assert results[0].status == 200
            assert final["status"] == "completed"
            assert final["result"] == {"opened": "g"}
            assert final["error"] is None and final["error_code"] is None
            check_openapi(h.document, "GET", "/api/command/{command_id}", results[0])


async def test_timestamps_are_rfc3339_utc_and_ordered(tmp_path):
    from datetime import datetime

    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            before = time.time()
            done = await h.send(200, client_id="a", command_type="echo", payload=[1], wait=True)
    stamps = [done["created_at"], done["sent_at"], done["completed_at"]]
    for stamp in stamps:
        assert stamp.endswith("Z")
    parsed = [datetime.fromisoformat(s.replace("Z", "+00:00")) for s in stamps]
    assert all(p.utcoffset().total_seconds() == 0 for p in parsed)
    assert parsed == sorted(parsed)
    assert abs(parsed[0].timestamp() - before) < 5


def test_times_are_shown_in_the_millisecond_they_fall_in():
    # Not rounded: a command id takes its creation millisecond rounded down.
    assert rfc3339(1764453252.6959996) == "2025-11-29T21:54:12.695Z"
    assert rfc3339(1764453252.9999996) == "2025-11-29T21:54:12.999Z"
    assert rfc3339(1764453252.0) == "2025-11-29T21:54:12.000Z"
    assert rfc3339(None) is None


async def test_a_command_is_listed_from_the_time_it_is_shown_created(tmp_path):
    # Shown as .696 s, it was left out of created_after=<its own created_at>
    # (its id says .695 s) and listed by created_before=<the same>.
    created = 1764453252.6959996
    command = Command(
        command_id=f"{int(created * 1000):012x}-00000001-0000abcd", client_id="a",
        command_type="echo", payload={}, created_at=created,
    )
    finished = time.time()  # recently, so the history trim keeps it
    command = transition(command, CommandStatus.EXECUTING, at=finished)
    store = MemoryStore()
    store.save(transition(command, CommandStatus.COMPLETED, at=finished, result=1))
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, command_store=store) as h:
            shown = (await h.request("GET", f"/api/command/{command.command_id}")).json()["created_at"]
            assert shown == "2025-11-29T21:54:12.695Z"
            after = (await h.request("GET", f"/api/commands?created_after={shown}")).json()
            assert [c["command_id"] for c in after["commands"]] == [command.command_id]
            before = (await h.request("GET", f"/api/commands?created_before={shown}")).json()
            assert before["commands"] == []


async def test_wait_true_returns_the_final_state_of_each_outcome(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            ok = await h.send(200, client_id="a", command_type="echo", payload={"x": "é"}, wait=True)
            assert ok["status"] == "completed" and ok["result"] == {"x": "é"}

            failed = await h.send(
                200, client_id="a", command_type="fail", payload={"message": "disk full"}, wait=True
            )
            assert failed["status"] == "failed"
            assert failed["error"] == "disk full" and failed["error_code"] == "executor_error"

            deep: Any = "bottom"
            for _ in range(99):  # 100 levels: the deepest a payload may be
                deep = [deep]
            echoed = await h.send(200, client_id="a", command_type="echo", payload=deep, wait=True)
            assert echoed["status"] == "completed" and echoed["result"] == deep

            unknown = await h.send(200, client_id="a", command_type="no-such-type", wait=True)
            assert unknown["status"] == "failed" and unknown["error_code"] == "unknown_command_type"

            # The wait is bounded by the command's own deadline.
            start = trio.current_time()
            timed_out = await h.send(
                200, client_id="a", command_type="gate", payload={"name": "t"}, timeout=0.3, wait=True
            )
            assert 0.3 <= trio.current_time() - start < 5
            assert timed_out["status"] == "timeout"
            assert timed_out["error_code"] == "execution_timeout"
            with trio.fail_after(5):
                await h.gates.cancelled["t"].wait()  # and the agent was told to stop


class GatedStore(MemoryStore):
    """The memory store made durable, whose commits wait while the test holds
    its gate shut: a command can then end before its send is answered."""

    durable = True

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.gate.set()
        self.held = trio.Event()  # a commit is waiting at the shut gate

    def shut(self) -> None:
        self.gate, self.held = trio.Event(), trio.Event()

    async def flush(self) -> None:
        if not self.gate.is_set():
            self.held.set()
            await self.gate.wait()
        await super().flush()


async def test_a_send_answered_after_its_command_ended_is_200_with_the_final_command(tmp_path):
    # Found in review: a command whose deadline came before the store's
    # commit was answered 202, which says "executing or pending".
    store = GatedStore()
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, command_store=store) as h:
            store.shut()
            answers: list[HttpResponse] = []

            async def send() -> None:
                answers.append(await h.request(
                    "POST", "/api/command", {"client_id": "late", "command_type": "echo", "connect_timeout": 0.1}
                ))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await store.held.wait()
                (queued,) = (await h.request("GET", "/api/commands")).json()["commands"]
                ended = await h.request("GET", f"/api/command/{queued['command_id']}?wait=10")
                assert ended.json()["status"] == "timeout", ended.body
                store.gate.set()
            (answer,) = answers
            assert answer.status == 200, answer.body
            command = answer.json()
            assert (command["status"], command["error_code"]) == ("timeout", "delivery_timeout")
            check_openapi(h.document, "POST", "/api/command", answer)


async def test_non_finite_numbers_in_a_result_fail_the_command_clearly(tmp_path):
    # NaN and Infinity are not JSON: the agent will not put them on the wire
    # (a non-Python peer could not read them), and says why instead.
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            response = await h.request(
                "POST", "/api/command", {"client_id": "a", "command_type": "not_a_number", "wait": True}
            )
    assert response.status == 200
    assert b"NaN" not in response.body and b"Infinity" not in response.body
    command = response.json()
    assert command["status"] == "failed" and command["error_code"] == "invalid_result"
    assert "JSON" in command["error"]


async def test_offline_agent_is_409_with_the_failed_command(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            body = await h.send(409, client_id="nobody", command_type="echo")
            assert body["status"] == "failed"
            assert body["error_code"] == "agent_offline"
            assert "nobody" in body["error"]
            assert body["sent_at"] is None and body["completed_at"] is not None
            # It is a real command: it can be fetched later.
            again = await h.request("GET", f"/api/command/{body['command_id']}")
            assert again.status == 200 and again.json() == body
            # wait=true changes nothing: still 409 at once.
            assert (await h.send(409, client_id="nobody", command_type="echo", wait=True))["status"] == "failed"


async def test_connect_timeout_holds_the_command_until_the_agent_connects(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            queued = await h.send(
                client_id="late", command_type="echo", payload="hi", connect_timeout=30, priority=5
            )
            assert queued["status"] == "pending" and queued["sent_at"] is None
            assert queued["connect_timeout"] == 30 and queued["priority"] == 5
            await h.start_agent("late")
            done = await h.request("GET", f"/api/command/{queued['command_id']}?wait=10")
            assert done.json()["status"] == "completed" and done.json()["result"] == "hi"

            # Nobody comes: it times out at its connect_timeout, as delivery_timeout.
            never = await h.send(client_id="never", command_type="echo", connect_timeout=0.2)
            final = await h.request("GET", f"/api/command/{never['command_id']}?wait=10")
            assert final.json()["status"] == "timeout"
            assert final.json()["error_code"] == "delivery_timeout"


# -- 400: bad input never reaches the manager, never a 500 ----------------------------------

BAD_SEND_BODIES: list[tuple[str, bytes, str]] = [
    ("not JSON", b"{bad", "invalid_json"),
    ("empty body", b"", "invalid_json"),
    ("JSON array", b"[1, 2]", "invalid_json"),
    ("JSON string", b'"client_id"', "invalid_json"),
    ("not UTF-8", b'{"client_id": "\xff\xfe", "command_type": "echo"}', "invalid_json"),
    ("NaN literal", b'{"client_id": "a", "command_type": "echo", "timeout": NaN}', "invalid_json"),
    ("Infinity in payload", b'{"client_id": "a", "command_type": "echo", "payload": [Infinity]}', "invalid_json"),
    ("float overflow", b'{"client_id": "a", "command_type": "echo", "payload": 1e999}', "invalid_json"),
    ("deep nesting", b'{"client_id": "a", "command_type": "echo", "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
    ("payload nested 101 deep", b'{"client_id": "a", "command_type": "echo", "payload": ' + b"[" * 101 + b"]" * 101 + b"}", "invalid_command"),
    ("missing client_id", b'{"command_type": "echo"}', "invalid_command"),
    ("missing command_type", b'{"client_id": "a"}', "invalid_command"),
    ("empty client_id", b'{"client_id": "", "command_type": "echo"}', "invalid_command"),
    ("numeric client_id", b'{"client_id": 7, "command_type": "echo"}', "invalid_command"),
    ("null command_type", b'{"client_id": "a", "command_type": null}', "invalid_command"),
    ("huge client_id", json.dumps({"client_id": "x" * 257, "command_type": "echo"}).encode(), "invalid_command"),
    ("timeout as string", b'{"client_id": "a", "command_type": "echo", "timeout": "5"}', "invalid_command"),
    ("timeout as bool", b'{"client_id": "a", "command_type": "echo", "timeout": true}', "invalid_command"),
    ("negative timeout", b'{"client_id": "a", "command_type": "echo", "timeout": -1}', "invalid_command"),
    ("zero timeout", b'{"client_id": "a", "command_type": "echo", "timeout": 0}', "invalid_command"),
    ("absurd timeout", b'{"client_id": "a", "command_type": "echo", "timeout": 1e12}', "invalid_command"),
    ("negative connect_timeout", b'{"client_id": "a", "command_type": "echo", "connect_timeout": -0.5}', "invalid_command"),
    ("absurd connect_timeout", b'{"client_id": "a", "command_type": "echo", "connect_timeout": 1e9}', "invalid_command"),
    ("fractional priority", b'{"client_id": "a", "command_type": "echo", "priority": 1.5}', "invalid_command"),
    ("bool priority", b'{"client_id": "a", "command_type": "echo", "priority": false}', "invalid_command"),
    ("huge priority", b'{"client_id": "a", "command_type": "echo", "priority": 99999999999999999999}', "invalid_command"),
    ("wait as string", b'{"client_id": "a", "command_type": "echo", "wait": "yes"}', "invalid_command"),
    ("misspelt field", b'{"client_id": "a", "command_type": "echo", "timout": 5}', "invalid_command"),
    # Found in review: the command ran, then its answer (and every later
    # listing that held it) was a 500, for a string UTF-8 cannot encode.
    ("lone surrogate in payload", b'{"client_id": "a", "command_type": "echo", "payload": "\\ud800"}', "invalid_json"),
    ("lone surrogate in a key", b'{"client_id": "a", "command_type": "echo", "payload": {"\\udc00": 1}}', "invalid_json"),
    ("lone surrogate in client_id", b'{"client_id": "a\\udfff", "command_type": "echo"}', "invalid_json"),
    ("number of 5000 digits", b'{"client_id": "a", "command_type": "echo", "payload": ' + b"9" * 5000 + b"}", "invalid_json"),
    ("byte order mark", b'\xef\xbb\xbf{"client_id": "a", "command_type": "echo"}', "invalid_json"),
    ("repeated key", b'{"client_id": "a", "command_type": "echo", "client_id": "b"}', "invalid_json"),
    ("repeated key in payload", b'{"client_id": "a", "command_type": "echo", "payload": {"x": 1, "x": 2}}', "invalid_json"),
]


async def test_bad_send_bodies_are_400_with_a_json_error(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            for name, body, code in BAD_SEND_BODIES:
                response = await h.request("POST", "/api/command", body=body)
                assert response.status == 400, (name, response.status, response.body[:200])
                error = response.json()["error"]
                assert error["code"] == code, (name, error)
                assert error["message"] and "\n" not in error["message"], name
                assert "sys." not in error["message"] and "utf-8-sig" not in error["message"], error
                check_openapi(h.document, "POST", "/api/command", response)
            # Nothing was created by any of them.
            listing = (await h.request("GET", "/api/commands")).json()
            assert listing == {"commands": [], "next_cursor": None}


async def test_bad_query_parameters_are_400(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            offline = await h.send(409, client_id="x", command_type="echo")
            url = f"/api/command/{offline['command_id']}"
            cases = [
                ("/api/commands?status=bogus", "/api/commands", "unknown status"),
                ("/api/commands?limit=0", "/api/commands", "limit"),
                ("/api/commands?limit=1001", "/api/commands", "limit"),
                ("/api/commands?limit=ten", "/api/commands", "limit"),
                ("/api/commands?limit=-1", "/api/commands", "limit"),
                ("/api/commands?clientid=x", "/api/commands", "unknown query parameter"),
                ("/api/commands?status=failed&status=pending", "/api/commands", "more than once"),
                ("/api/commands?created_after=yesterday", "/api/commands", "RFC 3339"),
                ("/api/commands?created_after=2026-11-28T10:00:00", "/api/commands", "with an offset"),
                ("/api/commands?created_before=2026-11-28", "/api/commands", "RFC 3339"),
                ("/api/commands?created_before=1795866808", "/api/commands", "RFC 3339"),
                # An unencoded "+" arrives as a space: the message says how to send it.
                ("/api/commands?created_after=2026-11-29T00:00:00+00:00", "/api/commands",
                 "not '2026-11-29T00:00:00 00:00'; a '+' in a URL query means a space: "
                 "send the offset's '+' as %2B"),
                (url + "?wait=-1", "/api/command/{command_id}", "wait"),
                (url + "?wait=soon", "/api/command/{command_id}", "wait"),
                (url + "?wait=nan", "/api/command/{command_id}", "wait"),
                (url + "?wait=1e12", "/api/command/{command_id}", "wait"),
                (url + "?wiat=1", "/api/command/{command_id}", "unknown query parameter"),
                ("/api/commands?limit=" + "9" * 5000, "/api/commands", "limit"),
                ("/api/audit?limit=" + "9" * 5000, "/api/audit", "limit"),
                ("/api/audit?cursor=" + "9" * 5000, "/api/audit", "cursor"),
                ("/api/commands?cursor=bogus", "/api/commands", "cursor"),
                ("/api/commands?cursor=%00", "/api/commands", "cursor"),
                ("/api/clients?x=1", "/api/clients", "unknown query parameter"),
            ] + [
                (f"/api/commands?created_after={when}", "/api/commands", "RFC 3339")
                for when in [
                    "2026-W48-1T09:00:00Z", "20261128T090000Z", "2026-11-28T09:00:00,5Z",
                    "2026-11-28T09:00:00.Z", "2026-11-31T09:00:00Z",
                ]
            ]
            for target, path, fragment in cases:
                response = await h.request("GET", target)
                assert response.status == 400, (target, response.body)
                assert response.json()["error"]["code"] == "invalid_request", target
                assert fragment in response.json()["error"]["message"], (target, response.body)
                check_openapi(h.document, "GET", path, response)


async def test_rfc3339_times_in_every_spelling_the_rfc_allows(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            for when in ["2026-11-28T09:00:00Z", "2026-11-28t09:00:00z", "2026-11-28T09:00:00.123456789+05:30",
                         "2026-11-28T09:00:00." + "1" * 100 + "Z"]:
                response = await h.request("GET", "/api/commands?created_after=" + when.replace("+", "%2B"))
                assert response.status == 200, (when, response.body)


async def test_unknown_query_parameters_on_a_post_are_refused_not_ignored(tmp_path):
    # ``POST /api/command?wait=true`` did not wait: the flag belongs in the body.
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            for target, message in [
                ("/api/command?wait=true", "unknown query parameter 'wait': POST /api/command takes no "
                 'query parameters; to wait, put "wait": true in the JSON body'),
                ("/api/command/x/cancel?force=1", "unknown query parameter 'force': "
                 "POST /api/command/x/cancel takes no query parameters"),
            ]:
                response = await h.request("POST", target, {"client_id": "a", "command_type": "echo"})
                assert response.status == 400, (target, response.body)
                assert response.json()["error"]["message"] == message
            clients = await h.request("GET", "/api/clients?verbose=1")
            assert clients.json()["error"]["message"] == (
                "unknown query parameter 'verbose': GET /api/clients takes no query parameters"
            )
            assert (await h.request("GET", "/api/commands")).json()["commands"] == []


async def test_an_agents_result_that_is_not_text_is_still_answered_as_json(tmp_path):
    # An agent may send what a request may not (a lone surrogate escape):
    # its command and every listing that shows it still answer, escaped.
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            response = await h.request(
                "POST", "/api/command", {"client_id": "a", "command_type": "lone_surrogate", "wait": True}
            )
            assert response.status == 200, response.body
            command = response.json()
            assert command["status"] == "completed" and command["result"] == {"text": "x\ud800"}
            assert b"\\ud800" in response.body
            for target in [f"/api/command/{command['command_id']}", "/api/commands"]:
                again = await h.request("GET", target)
                assert again.status == 200 and b"\\ud800" in again.body, (target, again.body)


async def test_unknown_ids_are_404_and_unknown_routes_are_json(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            for method, target, path in [
                ("GET", "/api/command/nope", "/api/command/{command_id}"),
                ("GET", "/api/command/nope?wait=5", "/api/command/{command_id}"),
                ("POST", "/api/command/nope/cancel", "/api/command/{command_id}/cancel"),
            ]:
                response = await h.request(method, target)
                assert response.status == 404, target
                assert response.json()["error"]["code"] == "not_found"
                check_openapi(h.document, method, path, response)

            page = await h.request("GET", "/no/such/page")
            assert page.status == 404
            assert page.json()["error"] == {"code": "not_found", "message": "no such endpoint: GET /no/such/page"}

            wrong_method = await h.request("DELETE", "/api/command")
            assert wrong_method.status == 405
            assert wrong_method.json()["error"]["code"] == "method_not_allowed"
            assert "POST" in wrong_method.headers["allow"]


async def test_a_method_an_endpoint_does_not_take_is_a_documented_json_405(tmp_path):
    # Found in review: OPTIONS answered 200 with an empty text/html body, and
    # no 405 was in the document.
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            for path, operations in h.document["paths"].items():
                target = path.replace("{command_id}", "x")
                takes = {method.upper() for method in operations}
                for method in ["OPTIONS", "DELETE", "PUT", "POST" if "POST" not in takes else "GET"]:
                    response = await h.request(method, target)
                    assert response.status == 405, (method, target, response.status, response.body)
                    error = response.json()["error"]
                    assert error["code"] == "method_not_allowed"
                    assert error["message"].startswith(f"method {method} is not allowed on {target}; allowed: ")
                    assert takes <= set(response.headers["allow"].split(", ")), (target, response.headers)
                    for operation in operations:
                        check_openapi(h.document, operation, path, response)


# -- 413 --------------------------------------------------------------------------------------


async def test_bodies_over_the_limit_are_413(tmp_path):
    limit = 4096
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, max_payload_bytes=limit) as h:
            big = {"client_id": "a", "command_type": "echo", "payload": "x" * limit}
            # A truthful Content-Length over the limit.
            response = await h.request("POST", "/api/command", big)
            assert response.status == 413
            assert response.json()["error"]["code"] == "payload_too_large"
            check_openapi(h.document, "POST", "/api/command", response)
            # A cancel's body too.
            response = await h.request("POST", "/api/command/x/cancel", {"reason": "x" * limit})
            assert response.status == 413
            assert response.json()["error"]["code"] == "payload_too_large"
            check_openapi(h.document, "POST", "/api/command/{command_id}/cancel", response)
            # A Content-Length that announces a huge body the client never sends:
            # refused from the header alone.
            response = await h.request(
                "POST", "/api/command", headers=[("Content-Length", str(10**9))], finish_body=False
            )
            assert response.status == 413
            assert response.json()["error"]["code"] == "payload_too_large"
            # No Content-Length at all (chunked): refused once the body outgrows the limit.
            response = await h.request(
                "POST", "/api/command", chunks=[b'{"client_id": "a", "command_type": "echo", "payload": "', b"y" * limit, b'"}']
            )
            assert response.status == 413
            assert response.json()["error"]["code"] == "payload_too_large"
            # Just under the limit is fine (the agent is offline: 409, but accepted).
            ok = {"client_id": "a", "command_type": "echo", "payload": "x" * (limit - 100)}
            assert (await h.request("POST", "/api/command", ok)).status == 409


async def test_payload_too_big_for_an_agent_frame_is_413(tmp_path):
    # The body limit allows it, but a COMMAND frame this large would be
    # refused by the agent's frame limit (1 MiB): refuse it here instead.
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, max_payload_bytes=2 << 20) as h:
            await h.start_agent("a")
            body = {"client_id": "a", "command_type": "echo", "payload": "z" * (1 << 20)}
            response = await h.request("POST", "/api/command", body)
            assert response.status == 413
            assert "frame" in response.json()["error"]["message"]
            # The agent is still connected and working.
            done = await h.send(200, client_id="a", command_type="echo", payload="small", wait=True)
            assert done["result"] == "small"


# -- cancel -------------------------------------------------------------------------------------


async def test_queue_full_is_429_and_creates_nothing(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, max_in_flight_per_agent=1, max_queued_per_agent=1) as h:
            await h.start_agent("a1")
            assert (await h.send(client_id="a1", command_type="gate", payload={"name": "x"}))["status"] == "executing"
            assert (await h.send(client_id="a1", command_type="echo"))["status"] == "pending"
            response = await h.request("POST", "/api/command", {"client_id": "a1", "command_type": "echo"})
            assert response.status == 429 and response.headers.get("retry-after") == "1"
            check_openapi(h.document, "POST", "/api/command", response)
            error = response.json()["error"]
            assert error["code"] == "queue_full" and "max_queued_per_agent" in error["message"]
            assert set(response.json()) == {"error"}
            listed = (await h.request("GET", "/api/commands?client_id=a1")).json()
            assert len(listed["commands"]) == 2
            # Once the queue drains, the agent takes commands again.
            h.gates.opened["x"].set()
            done = await h.send(200, client_id="a1", command_type="echo", payload="ok", wait=True)
            assert done["status"] == "completed" and done["result"] == "ok"


async def test_too_many_unfinished_commands_is_429_and_creates_nothing(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, max_unfinished_commands=1) as h:
            await h.start_agent("a1")
            await h.start_agent("a2")
            await h.send(client_id="a1", command_type="gate", payload={"name": "y"})
            for client_id, extra in (("a2", {}), ("offline", {"connect_timeout": 5})):
                body = await h.send(429, client_id=client_id, command_type="echo", **extra)
                assert body["error"]["code"] == "too_many_commands"
                assert "max_unfinished_commands" in body["error"]["message"]
            listed = (await h.request("GET", "/api/commands")).json()
            assert len(listed["commands"]) == 1
            assert (await h.request("GET", "/healthz")).json()["unfinished_commands"] == 1
            h.gates.opened["y"].set()
            assert (await h.send(200, client_id="a2", command_type="echo", wait=True))["status"] == "completed"


async def test_cancel_an_executing_command_then_409_when_terminal(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            sent = await h.send(client_id="a", command_type="gate", payload={"name": "c"})
            await h.gates.started["c"].wait()
            url = f"/api/command/{sent['command_id']}/cancel"

            bad = await h.request("POST", url, {"reason": 5})
            assert bad.status == 400 and bad.json()["error"]["code"] == "invalid_request"
            bad = await h.request("POST", url, {"why": "x"})
            assert bad.status == 400
            assert (await h.request("GET", f"/api/command/{sent['command_id']}")).json()["status"] == "executing"

            cancelled = await h.request("POST", url, {"reason": "wrong host"})
            assert cancelled.status == 200
            check_openapi(h.document, "POST", "/api/command/{command_id}/cancel", cancelled)
            body = cancelled.json()
            assert body["status"] == "cancelled"
            assert body["error"] == "wrong host" and body["error_code"] == "cancelled"
            await h.gates.cancelled["c"].wait()  # the agent stopped the executor

            again = await h.request("POST", url)
            assert again.status == 409
            check_openapi(h.document, "POST", "/api/command/{command_id}/cancel", again)
            assert again.json()["error"]["code"] == "already_finished"
            assert again.json()["command"]["status"] == "cancelled"

            # A pending (queued for an offline agent) command can be cancelled too.
            pending = await h.send(client_id="later", command_type="echo", connect_timeout=60)
            response = await h.request("POST", f"/api/command/{pending['command_id']}/cancel")
            assert response.status == 200 and response.json()["status"] == "cancelled"
            assert response.json()["error"] == "cancelled by operator"


# -- listing ------------------------------------------------------------------------------------


async def test_list_is_newest_first_filtered_and_paginated(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            created = []
            for i in range(5):
                created.append((await h.send(409, client_id="ghost", command_type="echo", payload=i))["command_id"])
            done = await h.send(200, client_id="a", command_type="echo", wait=True)
            newest = await h.send(client_id="a", command_type="gate", payload={"name": "l"})

            everything = (await h.request("GET", "/api/commands")).json()
            ids = [c["command_id"] for c in everything["commands"]]
            assert ids == [newest["command_id"], done["command_id"], *reversed(created)]
            assert everything["next_cursor"] is None

            # Pages of two, following next_cursor, add up to the whole list.
            seen: list[str] = []
            target = "/api/commands?limit=2"
            while True:
                response = await h.request("GET", target)
                check_openapi(h.document, "GET", "/api/commands", response)
                page = response.json()
                assert len(page["commands"]) <= 2
                seen += [c["command_id"] for c in page["commands"]]
                if page["next_cursor"] is None:
                    break
                target = f"/api/commands?limit=2&cursor={page['next_cursor']}"
            assert seen == ids

            by_client = (await h.request("GET", "/api/commands?client_id=ghost&limit=3")).json()
            assert [c["command_id"] for c in by_client["commands"]] == list(reversed(created))[:3]
            rest = (await h.request("GET", f"/api/commands?client_id=ghost&cursor={by_client['next_cursor']}")).json()
            assert [c["command_id"] for c in rest["commands"]] == list(reversed(created))[3:]
            assert rest["next_cursor"] is None

            # By creation time, as the API writes it (to the millisecond).
            since = (await h.request("GET", f"/api/commands?created_after={done['created_at']}")).json()
            assert [c["command_id"] for c in since["commands"]] == [newest["command_id"], done["command_id"]]
            before = (await h.request(
                "GET", f"/api/commands?created_before={done['created_at']}&created_after={everything['commands'][-1]['created_at']}"
            )).json()
            assert [c["command_id"] for c in before["commands"]] == list(reversed(created))

            failed = (await h.request("GET", "/api/commands?status=failed")).json()["commands"]
            assert {c["command_id"] for c in failed} == set(created)
            executing = (await h.request("GET", "/api/commands?status=executing&command_type=gate")).json()
            assert [c["command_id"] for c in executing["commands"]] == [newest["command_id"]]
            # Blank text parameters (a template left empty) are no filter at
            # all; a blank status or limit is not a value and is refused.
            blank = (await h.request("GET", "/api/commands?client_id=&command_type=&cursor=")).json()
            assert [c["command_id"] for c in blank["commands"]] == ids
            for query in ("status=", "limit="):
                refused = await h.request("GET", f"/api/commands?{query}")
                assert refused.status == 400 and refused.json()["error"]["code"] == "invalid_request"
            h.gates.opened["l"].set()


# -- clients, health, openapi, metrics ------------------------------------------------------


async def test_clients_lists_connected_agents_with_their_load(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            empty = await h.request("GET", "/api/clients")
            assert empty.json() == {"clients": []}
            await h.start_agent("b-agent", labels={"role": "db", "zone": "eu"})
            await h.start_agent("a-agent")
            await h.send(client_id="b-agent", command_type="gate", payload={"name": "k"})
            await h.gates.started["k"].wait()

            response = await h.request("GET", "/api/clients")
            check_openapi(h.document, "GET", "/api/clients", response)
            clients = response.json()["clients"]
            assert [c["client_id"] for c in clients] == ["a-agent", "b-agent"]
            b = clients[1]
            assert b["labels"] == {"role": "db", "zone": "eu"}
            assert b["remote_address"].startswith("127.0.0.1:")
            assert b["connected_at"].endswith("Z")
            assert (b["in_flight"], b["queued"]) == (1, 0)
            assert (clients[0]["in_flight"], clients[0]["queued"]) == (0, 0)
            h.gates.opened["k"].set()


async def test_healthz_and_openapi_document(tmp_path):
    openapi_spec_validator = pytest.importorskip("openapi_spec_validator")
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            health = await h.request("GET", "/healthz")
            assert health.status == 200
            assert health.json() == {"status": "ok", "connected_agents": 0, "unfinished_commands": 0}
            check_openapi(h.document, "GET", "/healthz", health)

            response = await h.request("GET", "/openapi.json")
            assert response.status == 200
            document = response.json()
    openapi_spec_validator.validate(document)
    assert document == h.document
    assert set(document["paths"]) == {
        "/api/command", "/api/command/{command_id}", "/api/command/{command_id}/cancel",
        "/api/commands", "/api/clients", "/api/audit", "/healthz", "/metrics", "/openapi.json",
    }


def test_every_error_code_a_command_can_end_with_is_published():
    # Found in review: API.md and the README listed 7 codes, the document 13,
    # and none had store_unavailable, or policy_denied / invalid_payload (a
    # recovered command today's policy refuses).
    codes = {code.value for code in ErrorCode} | {
        StoreUnavailable.code, PolicyDenied.code, InvalidPayload.code,
    }
    described = openapi_document()["components"]["schemas"]["Command"]["properties"]["error_code"]["description"]
    assert set(re.findall(r"[a-z]+(?:_[a-z]+)+|cancelled", described)) == codes, described
    assert described.endswith(", or a code a custom executor chose")

    root = Path(__file__).parent.parent
    api_md = (root / "docs" / "API.md").read_text()
    (row,) = [line for line in api_md.splitlines() if line.startswith("| `error`, `error_code` |")]
    listed = row.partition("is one of")[2].partition("or a code a custom executor chose")[0]
    assert set(re.findall(r"`([a-z_]+)`", listed)) == codes, row
    readme = " ".join((root / "README.md").read_text().split())
    listed = readme.partition("every failure has an `error_code` (")[2].partition(")")[0]
    assert set(re.findall(r"`([a-z_]+)`", listed)) == codes, listed
    assert listed.endswith("or a code a custom executor chose")


async def test_metrics_count_commands_by_outcome(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            await h.send(200, client_id="a", command_type="echo", wait=True)
            await h.send(200, client_id="a", command_type="echo", wait=True)
            await h.send(200, client_id="a", command_type="fail", wait=True)
            await h.send(409, client_id="offline", command_type="echo")
            await h.send(200, client_id="a", command_type="gate", payload={"name": "slow"}, timeout=0.2, wait=True)
            pending = await h.send(client_id="a", command_type="gate", payload={"name": "c"})
            await h.gates.started["c"].wait()
            await h.request("POST", f"/api/command/{pending['command_id']}/cancel")

            response = await h.request("GET", "/metrics")
            assert response.status == 200
            assert response.headers["content-type"].startswith("text/plain")
            check_openapi(h.document, "GET", "/metrics", response)
            values = samples(response.body.decode())
    assert values["command_sent_total"] == 5
    assert values["command_completed_total"] == 2
    assert values["command_failed_total"] == 2  # the executor failure and the offline agent
    assert values["command_timeout_total"] == 1
    assert values["command_cancelled_total"] == 1
    assert values["connected_agents"] == 1
    assert values["commands_unfinished"] == 0
    assert values["command_store_unwritten"] >= 0  # the default (SQLite) store's backlog
    assert values["quic_initials_deferred_total"] == 0  # one agent: no handshake waited
    assert values["command_duration_seconds_count{status=completed}"] == 2
    assert values["command_duration_seconds_count{status=timeout}"] == 1
    assert values["command_duration_seconds_sum{status=timeout}"] >= 0.2
    # Never delivered, so not timed.
    assert values["command_duration_seconds_count{status=failed}"] == 1


async def test_two_servers_in_one_process_have_separate_metrics(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path / "one") as one, running_server(tmp_path / "two") as two:
            await one.send(409, client_id="x", command_type="echo")
            first = samples((await one.request("GET", "/metrics")).body.decode())
            second = samples((await two.request("GET", "/metrics")).body.decode())
    assert first["command_failed_total"] == 1
    assert second["command_failed_total"] == 0


# -- connections: how long a client may hold one ------------------------------------------------


@attrs.define
class RawConnection:
    """One HTTP/1.1 connection, driven by hand: headers, body and reads as the test says."""

    address: tuple[str, int]
    stream: trio.SocketStream
    conn: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))

    @classmethod
    async def open(cls, address: tuple[str, int]) -> RawConnection:
        return cls(address, await trio.open_tcp_stream(*address))

    async def send_head(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        """The request line and headers (keep-alive: no ``Connection: close``)."""
        host = [("Host", f"{self.address[0]}:{self.address[1]}")]
        request = h11.Request(method=method, target=target, headers=host + headers)
        await self.stream.send_all(self.conn.send(request))

    async def send_body(self, data: bytes, *, end: bool = False) -> None:
        await self.stream.send_all(self.conn.send(h11.Data(data=data)))
        if end:
            await self.stream.send_all(self.conn.send(h11.EndOfMessage()))

    async def request(self, method: str, target: str, body: Any = NO_BODY, headers=()) -> HttpResponse:
        """A whole request, then its response; the connection stays open for the next one."""
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        data = json.dumps(body).encode() if body is not NO_BODY else b""
        framing = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))] if data else []
        await self.send_head(method, target, [*framing, *headers])
        await self.send_body(data, end=True)
        return await self.response()

    async def response(self) -> HttpResponse:
        return await read_response(self.conn, self.stream, closing_ends_it=False)

    async def assert_closed_by_server(self, within: float, *, reset_ok: bool = False) -> None:
        """The server ends the connection within ``within`` seconds (with a
        reset too if ``reset_ok``: the client was still sending)."""
        try:
            with trio.fail_after(within):
                data = await self.stream.receive_some(65536)
        except trio.TooSlowError:
            raise AssertionError(f"the server kept the connection open for more than {within} s") from None
        except trio.BrokenResourceError:
            assert reset_ok, "the server reset the connection"
            return
        assert data == b"", data


async def test_an_answer_that_leaves_the_body_unread_ends_the_connection(tmp_path, monkeypatch):
    # Headers announcing a body that never comes, to a route that answers without
    # reading it: the answer says "Connection: close", and the server closes
    # once no more of the body has come for UNREAD_BODY_PAUSE. (It used to keep
    # such a connection for as long as the client liked, and enough of them ran
    # the server out of file descriptors.)
    monkeypatch.setattr(http_api, "UNREAD_BODY_PAUSE", 0.2)
    data = tmp_path / "data"
    reader = issue_api_token(data, "reader", role="read")
    operator = issue_api_token(data, "operator", role="operate")
    as_json = ("Content-Type", "application/json")
    cases = [
        (401, "unauthorized", [("Content-Length", "1000"), as_json]),
        (401, "unauthorized", [("Content-Length", "1000"), as_json, ("Authorization", "Bearer qco_nope")]),
        (403, "forbidden", [("Content-Length", "1000"), as_json, ("Authorization", f"Bearer {reader}")]),
        (415, "unsupported_media_type",
         [("Content-Length", "1000"), ("Content-Type", "text/plain"), ("Authorization", f"Bearer {operator}")]),
        (413, "payload_too_large", [("Content-Length", str(10**9)), as_json, ("Authorization", f"Bearer {operator}")]),
    ]
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, require_api_token=True, max_payload_bytes=4096) as h:
            for status, code, headers in cases:
                client = await RawConnection.open(h.http_address)
                async with client.stream:
                    await client.send_head("POST", "/api/command", headers)
                    response = await client.response()
                    assert (response.status, response.json()["error"]["code"]) == (status, code), headers
                    check_openapi(h.document, "POST", "/api/command", response)
                    assert response.headers["connection"] == "close", (status, response.headers)
                    await client.assert_closed_by_server(within=2)

            # A request whose body was read keeps its connection for the next one.
            client = await RawConnection.open(h.http_address)
            async with client.stream:
                auth = [("Authorization", f"Bearer {operator}")]
                offline = await client.request("POST", "/api/command", {"client_id": "a", "command_type": "echo"}, auth)
                assert offline.status == 409 and "connection" not in offline.headers
                listed = await client.request("GET", "/api/commands", headers=auth)
                assert listed.status == 200
                assert [c["command_id"] for c in listed.json()["commands"]] == [offline.json()["command_id"]]


async def test_an_oversized_upload_gets_its_413_and_a_trickle_is_cut_off(tmp_path, monkeypatch):
    # The 413 is sent at once, from the headers; the rest of the body is then
    # still taken in while it keeps coming, so a client busy sending it is not
    # reset halfway (it would lose the answer), but only for UNREAD_BODY_LINGER.
    monkeypatch.setattr(http_api, "UNREAD_BODY_PAUSE", 0.2)
    monkeypatch.setattr(http_api, "UNREAD_BODY_LINGER", 1.0)
    size, piece = 32 << 20, b"x" * (64 << 10)
    head = [("Content-Type", "application/json"), ("Content-Length", str(size))]
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, max_payload_bytes=4096) as h:
            client = await RawConnection.open(h.http_address)
            async with client.stream:
                await client.send_head("POST", "/api/command", head)
                for _ in range(size // len(piece)):  # at loopback speed: well within the linger
                    await client.send_body(piece)
                response = await client.response()
                assert response.status == 413 and response.json()["error"]["code"] == "payload_too_large"
                assert response.headers["connection"] == "close"
                await client.assert_closed_by_server(within=2)

            # A body that keeps coming, slowly, for ever: cut off after the linger.
            client = await RawConnection.open(h.http_address)
            async with client.stream:
                await client.send_head("POST", "/api/command", head)
                assert (await client.response()).status == 413

                async def trickle() -> None:
                    try:
                        while True:
                            await client.send_body(b"x" * 100)
                            await trio.sleep(0.05)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trickle)
                    await client.assert_closed_by_server(within=1.0 + 2, reset_ok=True)
                    nursery.cancel_scope.cancel()


async def test_a_client_that_hangs_up_as_its_413_arrives_is_no_error_in_the_log(tmp_path, caplog):
    # Found in review: hypercorn closing the socket of a client that left
    # raced the app's send of the answer, and logged "Error in ASGI Framework"
    # with a BusyResourceError traceback, for 132 of 200 such clients.
    head = [("Content-Type", "application/json"), ("Content-Length", str(10**6))]
    with trio.fail_after(TEST_TIMEOUT), caplog.at_level("DEBUG", logger="hypercorn.error"):
        async with running_server(tmp_path, max_payload_bytes=4096) as h:
            for _ in range(40):
                client = await RawConnection.open(h.http_address)
                async with client.stream:
                    await client.send_head("POST", "/api/command", head)
                    await client.send_body(b"{" * 1000)
                    await client.stream.receive_some(65536)  # the 413 begins; hang up
            assert (await h.request("GET", "/healthz")).status == 200
    errors = [r for r in caplog.records if r.name == "hypercorn.error" and r.levelno >= logging.ERROR]
    assert errors == [], errors[0].getMessage()


async def test_a_long_poll_outlasts_the_keep_alive_timeout_and_an_idle_connection_does_not(
    tmp_path, monkeypatch
):
    # The keep-alive timeout bounds the time between requests (and for the
    # headers), never a request the server is still answering, nor a body that
    # is arriving; once the last answer is sent, an idle connection is closed.
    # (It used to stay open forever after the first request.)
    keep_alive = 0.3
    monkeypatch.setattr(service, "HTTP_KEEP_ALIVE_TIMEOUT", keep_alive)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            await h.start_agent("a")
            sent = await h.send(client_id="a", command_type="gate", payload={"name": "g"})
            await h.gates.started["g"].wait()
            client = await RawConnection.open(h.http_address)
            async with client.stream:
                # A long-poll several times the keep-alive timeout; the client sends nothing meanwhile.
                start = trio.current_time()
                polled = await client.request("GET", f"/api/command/{sent['command_id']}?wait=1")
                assert trio.current_time() - start >= 1
                assert polled.status == 200 and polled.json()["status"] == "executing"
                check_openapi(h.document, "GET", "/api/command/{command_id}", polled)

                # "wait": true, on the same connection: answered when the command ends (its timeout).
                start = trio.current_time()
                waited = await client.request("POST", "/api/command", {
                    "client_id": "a", "command_type": "gate", "payload": {"name": "w"}, "timeout": 1,
                    "wait": True,
                })
                assert trio.current_time() - start >= 1
                assert waited.status == 200 and waited.json()["status"] == "timeout"
                check_openapi(h.document, "POST", "/api/command", waited)

                # A body sent slowly, with pauses longer than the keep-alive timeout.
                client.conn.start_next_cycle()
                body = json.dumps({"client_id": "a", "command_type": "echo", "payload": "slow"}).encode()
                await client.send_head(
                    "POST", "/api/command",
                    [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                for i in range(0, len(body), 20):
                    await trio.sleep(keep_alive + 0.1)
                    await client.send_body(body[i:i + 20], end=i + 20 >= len(body))
                slow = await client.response()
                assert slow.status == 202 and slow.json()["payload"] == "slow", slow.body
                assert "connection" not in slow.headers

                # Now idle: closed once the keep-alive timeout has passed.
                await client.assert_closed_by_server(within=keep_alive + 2)


async def test_a_body_that_stops_coming_is_408_and_ends_the_connection(tmp_path, monkeypatch):
    # A route that reads the body waits BODY_TIMEOUT for all of it; then 408,
    # and the connection is closed (the rest of the body would be garbage).
    monkeypatch.setattr(http_api, "BODY_TIMEOUT", 0.5)
    monkeypatch.setattr(http_api, "UNREAD_BODY_PAUSE", 0.2)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path) as h:
            client = await RawConnection.open(h.http_address)
            async with client.stream:
                start = trio.current_time()
                await client.send_head(
                    "POST", "/api/command", [("Content-Type", "application/json"), ("Content-Length", "1000")]
                )
                await client.send_body(b'{"client_id": "a", ')
                response = await client.response()
                assert trio.current_time() - start >= 0.5
                assert response.status == 408 and response.json()["error"]["code"] == "request_timeout"
                assert response.headers["connection"] == "close"
                await client.assert_closed_by_server(within=2)
            # Nothing was created.
            assert (await h.request("GET", "/api/commands")).json()["commands"] == []


# -- shutdown ------------------------------------------------------------------------------------


async def test_shutdown_refuses_new_commands_and_drains_in_flight_ones(tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, shutdown_grace=15) as h:
            await h.start_agent("a")
            sent = await h.send(client_id="a", command_type="gate", payload={"name": "d"})
            await h.gates.started["d"].wait()

            h.shutdown.set()
            # serve() reacts to the event in its own task; the first request
            # virtually always sees it, a few are allowed (requests, not sleeps).
            for _ in range(20):
                health = await h.request("GET", "/healthz")
                if health.status == 503:
                    break
            assert health.status == 503
            assert health.json()["status"] == "shutting_down"
            assert health.json()["error"]["code"] == "shutting_down"
            check_openapi(h.document, "GET", "/healthz", health)

            refused = await h.request("POST", "/api/command", {"client_id": "a", "command_type": "echo"})
            assert refused.status == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            check_openapi(h.document, "POST", "/api/command", refused)

            # Reads still work during the drain, and the in-flight command finishes.
            async with trio.open_nursery() as nursery:
                results: list[HttpResponse] = []

                async def poll() -> None:
                    results.append(await h.request("GET", f"/api/command/{sent['command_id']}?wait=60"))

                nursery.start_soon(poll)
                h.gates.opened["d"].set()
            assert results[0].status == 200
            assert results[0].json()["status"] == "completed"
            # The drain is over: serve() returns on its own, well within the grace.
            await h.served.wait()


async def test_with_the_memory_store_shutdown_grace_ends_unfinished_commands(tmp_path):
    # Nothing would survive the restart, so nothing is left unfinished.
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, shutdown_grace=0.3, store="memory") as h:
            await h.start_agent("a")
            sent = await h.send(client_id="a", command_type="gate", payload={"name": "stuck"}, timeout=3600)
            await h.gates.started["stuck"].wait()
            async with trio.open_nursery() as nursery:
                results: list[HttpResponse] = []

                async def poll(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    task_status.started()
                    results.append(await h.request("GET", f"/api/command/{sent['command_id']}?wait=3600"))

                await nursery.start(poll)
                h.shutdown.set()
            # The one-hour command and the one-hour wait ended with the grace period.
            final = results[0].json()
            assert final["status"] == "failed"
            assert final["error_code"] == "server_shutdown"
            await h.served.wait()
