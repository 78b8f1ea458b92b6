"""The command policy: allow-lists by agent label and per-type JSON Schemas.
Read from the TOML file; enforced before anything is created, over HTTP (422)
and in Python (PolicyDenied / InvalidPayload)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio

from trio_quiccmd import CommandManager, InvalidPayload, PolicyDenied
from trio_quiccmd.config import ConfigError, load_settings
from trio_quiccmd.server.policy import AllowRule, CommandPolicy

from .httpclient import check_openapi
from .test_http_api import TEST_TIMEOUT, running_server

POLICY_TOML = """
[server]
http = "127.0.0.1:0"

[[policy.allow]]
labels = { role = "web" }
command_types = ["echo", "gate"]

[[policy.allow]]
command_types = ["sysinfo"]

[policy.schemas]
echo = { type = "object", required = ["text"], properties = { text = { type = "string" } } }
sleep = "schemas/sleep.json"
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "quiccmd.toml"
    path.write_text(text)
    return path


def test_the_policy_table_is_read_with_schema_files_relative_to_the_config(tmp_path):
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "sleep.json").write_text(json.dumps({"type": "object", "required": ["seconds"]}))
    settings = load_settings(["--config", str(write_config(tmp_path, POLICY_TOML))], {})
    policy = settings.policy
    assert policy.rules == (
        AllowRule({"role": "web"}, frozenset({"echo", "gate"})),
        AllowRule({}, frozenset({"sysinfo"})),
    )
    assert policy.schemas["sleep"] == {"type": "object", "required": ["seconds"]}
    policy.check("w", "echo", {"text": "hi"}, {"role": "web"})
    policy.check("d", "sysinfo", {}, {"role": "db"})
    with pytest.raises(PolicyDenied, match=r"command type 'echo' is not allowed for agent d \(role=db\)"):
        policy.check("d", "echo", {"text": "hi"}, {"role": "db"})
    with pytest.raises(PolicyDenied, match=r"\(no labels\)"):
        policy.check("x", "gate", {}, None)
    with pytest.raises(InvalidPayload, match="at text: 1 is not of type 'string'"):
        policy.check("w", "echo", {"text": 1}, {"role": "web"})
    # No policy at all: everything goes (as before there was one).
    assert load_settings([], {}).policy.is_empty


@pytest.mark.parametrize(
    "table, message",
    [
        ("[policy]\ndeny = []\n", "policy: unknown key(s) deny"),
        ("[[policy.allow]]\ncommand_types = []\n", "policy.allow[0].command_types must be a non-empty array"),
        ("[[policy.allow]]\nlabels = { a = 1 }\ncommand_types = ['x']\n", "policy.allow[0].labels must be a table of strings"),
        ("[policy.schemas]\necho = { type = 12 }\n", "policy.schemas.echo is not a valid JSON Schema"),
        ("[policy.schemas]\necho = 'missing.json'\n", "policy.schemas.echo: cannot read"),
        # References are resolved at start: a dangling or remote one is refused then.
        ("[policy.schemas]\necho = { '$ref' = '#/$defs/nope' }\n",
         "policy.schemas.echo: $ref '#/$defs/nope' does not resolve within the schema"),
        ("[policy.schemas]\necho = { properties = { a = { '$ref' = 'https://example.com/s.json' } } }\n",
         "policy.schemas.echo: $ref 'https://example.com/s.json' does not resolve"),
    ],
)
def test_a_bad_policy_is_a_one_line_config_error(tmp_path, table, message):
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", str(write_config(tmp_path, table))], {})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


async def test_the_python_api_refuses_before_creating_anything():
    manager = CommandManager(policy=CommandPolicy((AllowRule({}, frozenset({"echo"})),)))
    with pytest.raises(PolicyDenied):
        await manager.send_command("offline", "restart", {})
    # Refused before the offline check: no failed command was recorded either.
    assert (await manager.list_commands()).commands == []
    # An allowed type goes on to the usual checks (here: the agent is offline).
    command = await manager.send_command("offline", "echo", {})
    assert command.error_code == "agent_offline"


async def test_a_refused_command_is_422_and_never_reaches_the_agent(tmp_path):
    policy = CommandPolicy(
        (AllowRule({"role": "web"}, frozenset({"echo", "gate"})),),
        {"gate": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "maxLength": 8}}}},
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, policy=policy) as h:
            await h.start_agent("web-1", labels={"role": "web"})
            await h.start_agent("db-1", labels={"role": "db"})

            denied = await h.request("POST", "/api/command", {"client_id": "db-1", "command_type": "gate", "payload": {"name": "d"}})
            assert denied.status == 422
            assert denied.json()["error"] == {
                "code": "policy_denied",
                "message": "command type 'gate' is not allowed for agent db-1 (role=db)",
            }
            check_openapi(h.document, "POST", "/api/command", denied)

            invalid = await h.request("POST", "/api/command", {"client_id": "web-1", "command_type": "gate", "payload": {"name": "far-too-long"}})
            assert invalid.status == 422
            assert invalid.json()["error"]["code"] == "invalid_payload"
            assert "at name: 'far-too-long' is too long" in invalid.json()["error"]["message"]
            check_openapi(h.document, "POST", "/api/command", invalid)

            # Allowed and valid: it runs.
            ok = await h.send(202, client_id="web-1", command_type="gate", payload={"name": "ok"})
            await h.gates.started["ok"].wait()
            h.gates.opened["ok"].set()

            # The refused ones were never created, so never sent: only "ok" exists,
            # and no refused gate ever started on an agent.
            listed = (await h.request("GET", "/api/commands")).json()["commands"]
            assert [c["command_id"] for c in listed] == [ok["command_id"]]
            assert set(h.gates.started) == {"ok"}


def test_schemas_resolve_local_refs_check_formats_and_never_fetch(monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("a policy schema tried to fetch a $ref")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    policy = CommandPolicy(schemas={
        "ping": {
            "$defs": {"host": {"type": "string", "format": "ipv4"}},
            "type": "object",
            "properties": {"host": {"$ref": "#/$defs/host"}},
        },
        # Built without parse_policy (the Python API): the ref is only found at check time.
        "remote": {"$ref": "https://schemas.example/remote.json"},
    })
    policy.check("a", "ping", {"host": "10.0.0.1"}, None)
    with pytest.raises(InvalidPayload, match="at host: 'not an address' is not a 'ipv4'"):
        policy.check("a", "ping", {"host": "not an address"}, None)
    with pytest.raises(InvalidPayload, match="payload for 'remote' cannot be checked"):
        policy.check("a", "remote", {}, None)


def test_unique_items_is_checked_in_linear_time():
    policy = CommandPolicy(schemas={"batch": {"type": "array", "uniqueItems": True}})
    # jsonschema's own check compared these 20,000 objects (~250 KB) pairwise:
    # minutes of the event loop. Now: milliseconds.
    items = [{"host": f"h{i}", "n": i} for i in range(20_000)]
    start = time.perf_counter()
    policy.check("a", "batch", items, None)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(InvalidPayload, match="has non-unique elements"):
        policy.check("a", "batch", [*items, {"n": 7, "host": "h7"}], None)
    # JSON equality: 1 and 1.0 are the same, true and 1 are not, key order does not matter.
    with pytest.raises(InvalidPayload, match="non-unique"):
        policy.check("a", "batch", [{"a": [1, {"b": 2}]}, {"a": [1.0, {"b": 2.0}]}], None)
    policy.check("a", "batch", [1, True, "1", [1], {"1": 1}, None, 0, False], None)


async def test_a_schema_that_cannot_be_applied_is_an_audited_422_not_a_500(tmp_path):
    policy = CommandPolicy(schemas={"remote": {"$ref": "https://schemas.example/remote.json"}})
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, policy=policy) as h:
            await h.start_agent("a")
            refused = await h.request("POST", "/api/command", {"client_id": "a", "command_type": "remote"})
            assert refused.status == 422, refused.body
            assert refused.json()["error"]["code"] == "invalid_payload"
            check_openapi(h.document, "POST", "/api/command", refused)
            audit = (await h.request("GET", "/api/audit")).json()["entries"]
            assert [(e["outcome"], e["error_code"]) for e in audit] == [("refused", "invalid_payload")]
