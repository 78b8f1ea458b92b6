"""The audit log: every send and cancel over HTTP, accepted or refused, with
who asked; as log lines, in ``audit.jsonl`` across restarts, and through
``GET /api/audit`` (filters, pagination, the OpenAPI schema)."""

from __future__ import annotations

import json
import logging

import pytest

import trio

from trio_quiccmd.logs import KeyValueFormatter
from trio_quiccmd.server.audit import AuditLog
from trio_quiccmd.server.policy import AllowRule, CommandPolicy
from trio_quiccmd.tokens import issue_api_token

from .httpclient import check_openapi
from .test_http_api import TEST_TIMEOUT, running_server


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def summary(entries: list[dict]) -> list[tuple]:
    return [
        (e["actor"], e["action"], e["client_id"], e["command_type"], e["outcome"], e["error_code"])
        for e in entries
    ]


async def test_sends_and_cancels_are_audited_and_queryable(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trio_quiccmd.audit")
    data = tmp_path / "data"
    alice = issue_api_token(data, "alice", role="operate")
    bob = issue_api_token(data, "bob", role="read")
    policy = CommandPolicy((AllowRule({}, frozenset({"echo", "gate"})),))
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, require_api_token=True, policy=policy) as h:
            await h.start_agent("a")

            async def post(token: str, target: str, body=None):
                return await h.request("POST", target, body if body is not None else {}, headers=bearer(token))

            sent = await post(alice, "/api/command", {"client_id": "a", "command_type": "gate", "payload": {"name": "g"}})
            assert sent.status == 202
            command_id = sent.json()["command_id"]
            assert (await post(alice, "/api/command", {"client_id": "a", "command_type": "sleep"})).status == 422
            assert (await post(alice, "/api/command", {"client_id": "gone", "command_type": "echo"})).status == 409
            assert (await post(bob, "/api/command", {"client_id": "a", "command_type": "echo"})).status == 403
            assert (await post(alice, f"/api/command/{command_id}/cancel")).status == 200
            assert (await post(alice, f"/api/command/{command_id}/cancel")).status == 409
            assert (await post(alice, "/api/command/nope/cancel")).status == 404

            response = await h.request("GET", "/api/audit", headers=bearer(bob))
            assert response.status == 200
            check_openapi(h.document, "GET", "/api/audit", response)
            page = response.json()
            assert page["next_cursor"] is None
            entries = page["entries"]
            # Newest first.
            assert summary(entries) == [
                ("alice", "cancel", None, None, "refused", "not_found"),
                ("alice", "cancel", "a", "gate", "refused", "already_finished"),
                ("alice", "cancel", "a", "gate", "accepted", None),
                ("bob", "send", None, None, "refused", "forbidden"),
                ("alice", "send", "gone", "echo", "refused", "agent_offline"),
                ("alice", "send", "a", "sleep", "refused", "policy_denied"),
                ("alice", "send", "a", "gate", "accepted", None),
            ]
            assert entries[-1]["command_id"] == command_id
            assert entries[-1]["remote"] == "127.0.0.1"
            assert entries[-1]["at"].endswith("Z")
            assert [e["id"] for e in entries] == list(range(7, 0, -1))

            # Filters and pages.
            async def audit(query: str) -> dict:
                response = await h.request("GET", "/api/audit?" + query, headers=bearer(bob))
                assert response.status == 200, response.body
                check_openapi(h.document, "GET", "/api/audit", response)
                return response.json()

            assert len((await audit("outcome=refused"))["entries"]) == 5
            assert summary((await audit("actor=bob"))["entries"]) == [("bob", "send", None, None, "refused", "forbidden")]
            assert [e["action"] for e in (await audit(f"command_id={command_id}"))["entries"]] == ["cancel", "cancel", "send"]
            assert len((await audit("action=send&client_id=a"))["entries"]) == 2
            first = await audit("limit=3")
            second = await audit(f"limit=3&cursor={first['next_cursor']}")
            third = await audit(f"limit=3&cursor={second['next_cursor']}")
            assert [e["id"] for e in first["entries"] + second["entries"] + third["entries"]] == list(range(7, 0, -1))
            assert third["next_cursor"] is None
            bad = await h.request("GET", "/api/audit?action=delete", headers=bearer(bob))
            assert bad.status == 400 and bad.json()["error"]["code"] == "invalid_request"
            check_openapi(h.document, "GET", "/api/audit", bad)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Audit ")]
    assert len(lines) == 7
    assert lines[0] == (
        f"Audit action=send actor=alice client_id=a command_type=gate command_id={command_id} "
        "outcome=accepted error_code=None remote=127.0.0.1"
    )

    # The file has every entry, one JSON object a line, and is private.
    path = data / "audit.jsonl"
    assert (path.stat().st_mode & 0o777) == 0o600
    recorded = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in recorded] == list(range(1, 8))

    # A restarted server answers from the file, and numbering carries on.
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, require_api_token=True) as h:
            again = (await h.request("GET", "/api/audit", headers=bearer(bob))).json()["entries"]
            assert summary(again) == summary(entries)
            await h.request("POST", "/api/command", {"client_id": "x", "command_type": "echo"}, headers=bearer(alice))
            newest = (await h.request("GET", "/api/audit?limit=1", headers=bearer(bob))).json()["entries"]
            assert newest[0]["id"] == 8


def test_the_audit_log_keeps_the_newest_entries_in_memory_and_skips_bad_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_entries=3)
    for i in range(5):
        log.record(actor="a", action="send", client_id=f"c{i}", command_type="echo", command_id=None, outcome="accepted")
    with path.open("a") as f:
        f.write("not json\n")
    reloaded = AuditLog(path, max_entries=3)
    entries, cursor = reloaded.query(limit=10)
    # The last three lines are c3, c4 and the bad one: the bad one is skipped.
    assert [e.client_id for e in entries] == ["c4", "c3"]
    assert cursor is None
    assert reloaded.record(actor="a", action="cancel", client_id=None, command_type=None, command_id="x", outcome="refused", error_code="not_found").id == 6


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"id": "seven", "at": 1, "actor": "a", "action": "send", "client_id": null, "command_type": null, "command_id": null, "outcome": "accepted"}',
        '{"id": true, "at": 1, "actor": "a", "action": "send", "client_id": null, "command_type": null, "command_id": null, "outcome": "accepted"}',
        '{"id": 9, "at": "noon", "actor": "a", "action": "send", "client_id": null, "command_type": null, "command_id": null, "outcome": "accepted"}',
        '{"id": 9, "at": 1, "actor": ["a"], "action": "send", "client_id": 5, "command_type": null, "command_id": null, "outcome": "accepted"}',
        "[1, 2]",
        # Found in review: these stopped the server's start (the first two) or
        # made every GET /api/audit a 500 (the times beyond any date).
        b"\xff\xfe garbage",
        "[" * 100_000 + "]" * 100_000,
        '{"id": 9, "at": NaN, "actor": "a", "action": "send", "client_id": null, "command_type": null, "command_id": null, "outcome": "accepted"}',
        '{"id": 9, "at": 1e300, "actor": "a", "action": "send", "client_id": null, "command_type": null, "command_id": null, "outcome": "accepted"}',
        '{"id": 9, "at": 1, "actor": "a", "action": "delete", "client_id": null, "command_type": null, "command_id": null, "outcome": "accepted"}',
    ],
    ids=["id-text", "id-bool", "at-text", "wrong-types", "not-object", "not-utf8", "deep", "at-nan", "at-1e300", "action"],
)
def test_a_damaged_audit_line_is_skipped_with_a_warning_not_a_crash(tmp_path, caplog, bad_line):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record(actor="a", action="send", client_id="c", command_type="echo", command_id=None, outcome="accepted")
    with path.open("ab") as f:
        f.write((bad_line if isinstance(bad_line, bytes) else bad_line.encode()) + b"\n")
    with caplog.at_level(logging.WARNING, logger="trio_quiccmd.audit"):
        reloaded = AuditLog(path)
    entries, _ = reloaded.query(limit=10)
    assert [e.client_id for e in entries] == ["c"]
    assert any("skipped" in r.getMessage() and "count=1" in r.getMessage() for r in caplog.records)
    # It goes on numbering after the good entries.
    assert reloaded.record(actor="a", action="send", client_id="d", command_type="echo", command_id=None, outcome="accepted").id == 2


def test_an_entry_after_a_line_cut_short_is_not_lost(tmp_path):
    # Found in review: a crash or a full disk mid-write leaves part of a line;
    # the next entry was appended to it, and both were skipped at the next start.
    path = tmp_path / "audit.jsonl"
    AuditLog(path).record(actor="a", action="send", client_id="c1", command_type="echo", command_id=None, outcome="accepted")
    with path.open("a") as f:
        f.write('{"id":2,"at":1,"actor":"a","action":"send","cli')
    log = AuditLog(path)
    log.record(actor="a", action="send", client_id="c3", command_type="echo", command_id=None, outcome="accepted")
    entries, _ = AuditLog(path).query(limit=10)
    assert [e.client_id for e in entries] == ["c3", "c1"]


def test_an_over_long_value_is_kept_cut_short(tmp_path):
    # Found in review: a URL's command id of 60,000 characters, refused 403
    # for a cross-origin request without a token, was kept whole in memory,
    # the file and the log: 2,000 such requests took 120 MB of file and 120 MB of memory.
    path = tmp_path / "audit.jsonl"
    entry = AuditLog(path).record(
        actor="anonymous", action="cancel", client_id=None, command_type=None, command_id="D" * 60_000,
        outcome="refused", error_code="forbidden",
    )
    assert entry.command_id == "D" * 256 + "… (60000 characters in all)"
    assert path.stat().st_size < 1_000


def test_caller_chosen_values_cannot_split_or_forge_audit_log_lines(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trio_quiccmd.audit")
    AuditLog(None).record(
        actor="alice", action="send", client_id="a b", command_type="x\nAudit action=cancel",
        command_id=None, outcome="refused", error_code="forbidden",
    )
    [record] = caplog.records
    # Quoted once, by any formatter, ours too (it quoted the quotes again).
    for line in (record.getMessage(), KeyValueFormatter().format(record)):
        assert "\n" not in line
        assert "client_id='a b' command_type='x\\nAudit action=cancel'" in line, line


async def test_sends_and_cancels_through_the_python_api_are_audited_too(autojump_clock):
    from trio_quiccmd import CommandManager, PolicyDenied

    from .recording import connect_agent

    audit = AuditLog(None)
    policy = CommandPolicy(rules=(AllowRule(labels={}, command_types=frozenset({"echo"})),))
    manager = CommandManager(audit=audit, policy=policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        connect_agent(manager, "c1")
        sent = await manager.send_command("c1", "echo", {"x": 1}, connect_timeout=5)
        await manager.cancel(sent.command_id, "changed my mind")
        offline = await manager.send_command("nobody", "echo")
        with pytest.raises(PolicyDenied):
            await manager.send_command("c1", "shell", {"command": "id"})
        nursery.cancel_scope.cancel()
    entries, _ = audit.query()
    assert [
        (e.actor, e.action, e.client_id, e.command_id, e.outcome, e.error_code) for e in reversed(entries)
    ] == [
        ("python-api", "send", "c1", sent.command_id, "accepted", None),
        ("python-api", "cancel", "c1", sent.command_id, "accepted", None),
        ("python-api", "send", "nobody", offline.command_id, "refused", "agent_offline"),
        ("python-api", "send", "c1", None, "refused", "policy_denied"),
    ]
