"""The OpenAPI 3.1 document ``GET /openapi.json`` serves.

Hand-written rather than generated: the routes validate by hand (to give
precise messages and strict unknown-field checks), so a generator would have
nothing to read. The tests validate real responses against these schemas, so
the document cannot drift from what the endpoints return.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from ..errors import InvalidPayload, PolicyDenied, StoreUnavailable
from ..model import PRIORITY_RANGE, CommandStatus, ErrorCode

API_VERSION = "1.0.0"

#: Every error_code a command can end with, besides one a custom executor
#: chooses: the model's, and the server's own (the store did not take a send;
#: after a restart, today's policy refused a recovered command). Built from
#: the code definitions so that the published list cannot miss one.
COMMAND_ERROR_CODES: tuple[str, ...] = (
    *(code.value for code in ErrorCode),
    StoreUnavailable.code,
    PolicyDenied.code,
    InvalidPayload.code,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


@functools.cache
def printable_pattern() -> str:
    """A regex of the strings the API takes as a client_id or command_type:
    one or more characters Python calls printable (``str.isprintable``: no
    control, format or unassigned characters, no line or paragraph separators,
    no space but " "). A character class of literal characters, so it means
    the same to ECMA-262 and Python ``re``."""
    ranges: list[str] = []
    start: int | None = None
    for code in range(sys.maxunicode + 2):
        printable = code <= sys.maxunicode and chr(code).isprintable()
        if printable and start is None:
            start = code
        elif not printable and start is not None:
            low, high = (chr(c) if chr(c) not in "\\]^-[" else "\\" + chr(c) for c in (start, code - 1))
            ranges.append(low if start == code - 1 else f"{low}-{high}")
            start = None
    return "^[" + "".join(ranges) + "]+$"


def openapi_document(
    *,
    default_timeout: float = 30.0,
    max_timeout: float = 86400.0,
    max_payload_bytes: int = 1 << 20,
    default_list_limit: int = 100,
    max_list_limit: int = 1000,
) -> dict[str, Any]:
    """The document, with this server's limits filled into the schemas."""
    statuses = [s.value for s in CommandStatus]
    timestamp = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"}
    nullable_timestamp = {"type": ["string", "null"], "format": "date-time", "description": "RFC 3339, UTC; null until it happens"}
    command_id_param = {
        "name": "command_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    bad_request = _error("Bad JSON, a wrong type, an unknown field or parameter, or a value out of range")
    unauthorized = _error(
        "No bearer token where one is required, or one the server does not know "
        "(error unauthorized; has WWW-Authenticate: Bearer)"
    )
    forbidden = _error(
        "The token lacks the role (operate) or its command-type / agent-label "
        "restrictions exclude this command; or a request without a token came with a "
        "Host or Origin that is not this API's loopback address (error forbidden)"
    )
    forbidden_anonymous = _error(
        "A request without a token came with a Host or Origin that is not this API's "
        "loopback address (error forbidden): send a bearer token"
    )
    store_unavailable = _error("The command store cannot be read (store_unavailable)")
    unsupported = _error(
        "The request has a body that is not sent as Content-Type: application/json "
        "(error unsupported_media_type)"
    )
    not_found = _error("No command with this id (or it was purged from the history)")
    method_not_allowed = _error(
        "A method this path does not take, OPTIONS included (error method_not_allowed; "
        "the Allow header lists the methods it takes)"
    )
    body_too_slow = _error(
        "The body did not arrive in time (error request_timeout); the connection is closed"
    )

    schemas: dict[str, Any] = {
        "Command": {
            "type": "object",
            "required": [
                "command_id", "client_id", "command_type", "payload", "status", "result",
                "error", "error_code", "priority", "timeout", "connect_timeout",
                "created_at", "sent_at", "completed_at",
            ],
            "additionalProperties": False,
            "properties": {
                "command_id": {"type": "string", "description": "Unique; sorts in creation order"},
                "client_id": {"type": "string"},
                "command_type": {"type": "string"},
                "payload": {"description": "Any JSON value, as sent"},
                "status": {"type": "string", "enum": statuses},
                "result": {"description": "The executor's return value (null until completed)"},
                "error": {"type": ["string", "null"], "description": "Human-readable reason, when not completed"},
                "error_code": {
                    "type": ["string", "null"],
                    "description": "Machine-readable reason, null when completed: "
                    + ", ".join(COMMAND_ERROR_CODES) + ", or a code a custom executor chose",
                },
                "priority": {"type": "integer"},
                "timeout": {"type": "number"},
                "connect_timeout": {"type": "number"},
                "created_at": timestamp,
                "sent_at": nullable_timestamp,
                "completed_at": nullable_timestamp,
            },
        },
        "SendCommand": {
            "type": "object",
            "required": ["client_id", "command_type"],
            "additionalProperties": False,
            "properties": {
                "client_id": {
                    "type": "string", "minLength": 1, "maxLength": 256, "pattern": printable_pattern(),
                    "description": "Printable text: no control or other unprintable characters",
                },
                "command_type": {
                    "type": "string", "minLength": 1, "maxLength": 256, "pattern": printable_pattern(),
                    "description": "Printable text: no control or other unprintable characters",
                },
                "payload": {"description": "Any JSON value", "default": {}},
                "timeout": {
                    "type": "number", "exclusiveMinimum": 0, "maximum": max_timeout,
                    "default": default_timeout,
                    "description": "Seconds to deliver and then seconds to answer",
                },
                "connect_timeout": {
                    "type": "number", "minimum": 0, "maximum": max_timeout, "default": 0,
                    "description": "Seconds to wait for an offline agent to connect; 0 fails at once",
                },
                "priority": {
                    "type": "integer", "minimum": PRIORITY_RANGE[0], "maximum": PRIORITY_RANGE[1], "default": 0,
                    "description": "Higher is sent first when the agent's window is full",
                },
                "wait": {"type": "boolean", "default": False, "description": "Answer with the final state"},
            },
        },
        "CancelCommand": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 1024}},
        },
        "CommandPage": {
            "type": "object",
            "required": ["commands", "next_cursor"],
            "additionalProperties": False,
            "properties": {
                "commands": {"type": "array", "items": _ref("Command")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as ?cursor= for the next (older) page; null on the last",
                },
            },
        },
        "Client": {
            "type": "object",
            "required": ["client_id", "labels", "remote_address", "connected_at", "in_flight", "queued"],
            "additionalProperties": False,
            "properties": {
                "client_id": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "remote_address": {"type": "string", "description": "host:port or [v6]:port"},
                "connected_at": timestamp,
                "in_flight": {"type": "integer", "minimum": 0},
                "queued": {"type": "integer", "minimum": 0},
            },
        },
        "ClientList": {
            "type": "object",
            "required": ["clients"],
            "additionalProperties": False,
            "properties": {"clients": {"type": "array", "items": _ref("Client")}},
        },
        "Health": {
            "type": "object",
            "required": ["status", "connected_agents", "unfinished_commands"],
            "additionalProperties": False,
            "properties": {
                "status": {"type": "string", "enum": ["ok", "shutting_down"]},
                "connected_agents": {"type": "integer", "minimum": 0},
                "unfinished_commands": {"type": "integer", "minimum": 0},
                "error": _ref("ErrorDetail"),
            },
        },
        "ErrorDetail": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
            },
        },
        "AuditEntry": {
            "type": "object",
            "required": [
                "id", "at", "actor", "action", "client_id", "command_type", "command_id",
                "outcome", "error_code", "remote",
            ],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "integer", "minimum": 1, "description": "Increasing; never reused"},
                "at": timestamp,
                "actor": {"type": "string", "description": "The API token's name, or anonymous"},
                "action": {"type": "string", "enum": ["send", "cancel"]},
                "client_id": {"type": ["string", "null"]},
                "command_type": {"type": ["string", "null"]},
                "command_id": {"type": ["string", "null"]},
                "outcome": {"type": "string", "enum": ["accepted", "refused"]},
                "error_code": {
                    "type": ["string", "null"],
                    "description": "Why it was refused: the API error code (forbidden, "
                    "policy_denied, invalid_payload, queue_full, not_found, agent_offline, ...)",
                },
                "remote": {"type": "string", "description": "The caller's address"},
            },
        },
        "AuditPage": {
            "type": "object",
            "required": ["entries", "next_cursor"],
            "additionalProperties": False,
            "properties": {
                "entries": {"type": "array", "items": _ref("AuditEntry")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as ?cursor= for the next (older) page; null on the last",
                },
            },
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {
                "error": _ref("ErrorDetail"),
                "command": _ref("Command"),
            },
        },
    }

    paths: dict[str, Any] = {
        "/api/command": {
            "post": {
                "operationId": "sendCommand",
                "summary": "Send a command to an agent",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SendCommand")}},
                },
                "responses": {
                    "200": _json(
                        _ref("Command"),
                        "The command in its final state: wait was true, or it was already final "
                        "when answered (e.g. its deadline came before the store's commit, or it "
                        "was cancelled meanwhile)",
                    ),
                    "202": _json(
                        _ref("Command"),
                        "Accepted and not final yet: executing or pending (with wait, only when "
                        "the server began a graceful shutdown first)",
                    ),
                    "400": bad_request,
                    "409": _json(
                        _ref("Command"),
                        "The agent is offline and connect_timeout is 0: the failed command "
                        "(status failed, error_code agent_offline)",
                    ),
                    "401": unauthorized,
                    "403": forbidden,
                    "408": body_too_slow,
                    "413": _error(f"The body is over {max_payload_bytes} bytes, or the payload "
                                  "is over the agents' frame limit"),
                    "415": unsupported,
                    "422": _error("The command policy refused it and nothing was created or sent: "
                                  "the type is not allowed for this agent (policy_denied) or the "
                                  "payload does not match the type's JSON Schema (invalid_payload)"),
                    "429": _error("A limit was hit and nothing was created: the agent's queue is "
                                  "full (queue_full) or the server holds too many unfinished "
                                  "commands (too_many_commands); retry later"),
                    "503": _error("The server is shutting down (shutting_down), or the command "
                                  "store did not store the command in time; it was not sent "
                                  "(store_unavailable)"),
                },
            }
        },
        "/api/command/{command_id}": {
            "get": {
                "operationId": "getCommand",
                "summary": "A command's current state, optionally waiting for the final one",
                "parameters": [
                    command_id_param,
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0, "maximum": max_timeout},
                        "description": "Seconds to wait for a terminal state (long poll)",
                    },
                ],
                "responses": {
                    "200": _json(_ref("Command"), "The command (terminal, or as it is when the wait ended)"),
                    "400": bad_request,
                    "401": unauthorized,
                    "403": forbidden_anonymous,
                    "404": not_found,
                    "503": store_unavailable,
                },
            }
        },
        "/api/command/{command_id}/cancel": {
            "post": {
                "operationId": "cancelCommand",
                "summary": "Cancel a pending or executing command",
                "parameters": [command_id_param],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("CancelCommand")}},
                },
                "responses": {
                    "200": _json(_ref("Command"), "The command, cancelled"),
                    "400": bad_request,
                    "401": unauthorized,
                    "403": forbidden,
                    "404": not_found,
                    "408": body_too_slow,
                    "409": _error("Already finished; the error carries the command"),
                    "413": _error(f"The body is over {max_payload_bytes} bytes (payload_too_large)"),
                    "415": unsupported,
                    "503": _error("The cancel took effect but the command store did not store it "
                                  "in time (store_unavailable)"),
                },
            }
        },
        "/api/commands": {
            "get": {
                "operationId": "listCommands",
                "summary": "Commands, newest first, filtered and paginated",
                "parameters": [
                    {"name": "client_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "status", "in": "query", "schema": {"type": "string", "enum": statuses}},
                    {"name": "command_type", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer", "minimum": 1, "maximum": max_list_limit,
                            "default": default_list_limit,
                        },
                    },
                    {
                        "name": "created_after",
                        "in": "query",
                        "schema": {"type": "string", "format": "date-time"},
                        "description": "Only commands created at or after this RFC 3339 time (millisecond precision)",
                    },
                    {
                        "name": "created_before",
                        "in": "query",
                        "schema": {"type": "string", "format": "date-time"},
                        "description": "Only commands created before this RFC 3339 time",
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^([0-9a-f]{12}-[0-9a-f]{8}-[0-9a-f]{8})?$"},
                        "description": "next_cursor of the previous page",
                    },
                ],
                "responses": {
                    "200": _json(_ref("CommandPage"), "A page of commands"),
                    "400": bad_request,
                    "401": unauthorized,
                    "403": forbidden_anonymous,
                    "503": store_unavailable,
                },
            }
        },
        "/api/clients": {
            "get": {
                "operationId": "listClients",
                "summary": "Connected agents",
                "responses": {
                    "200": _json(_ref("ClientList"), "The connected agents"),
                    "400": bad_request,
                    "401": unauthorized,
                    "403": forbidden_anonymous,
                },
            }
        },
        "/api/audit": {
            "get": {
                "operationId": "listAudit",
                "summary": "Audit log of sends and cancels, newest first, filtered and paginated",
                "parameters": [
                    {"name": "actor", "in": "query", "schema": {"type": "string"}},
                    {"name": "action", "in": "query", "schema": {"type": "string", "enum": ["send", "cancel"]}},
                    {"name": "client_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "command_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "outcome", "in": "query", "schema": {"type": "string", "enum": ["accepted", "refused"]}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer", "minimum": 1, "maximum": max_list_limit,
                            "default": default_list_limit,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[0-9]{0,18}$"},
                        "description": "next_cursor of the previous page",
                    },
                ],
                "responses": {
                    "200": _json(_ref("AuditPage"), "A page of audit entries"),
                    "400": bad_request,
                    "401": unauthorized,
                    "403": forbidden_anonymous,
                    "404": _error("The audit log is not enabled on this server"),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Liveness and readiness",
                "responses": {
                    "200": _json(_ref("Health"), "Serving"),
                    "503": _json(_ref("Health"), "Shutting down: send no new work here"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": unauthorized,
                    "403": forbidden_anonymous,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document")},
            }
        },
    }

    # Bearer tokens: required off loopback (or with require_api_token), optional
    # otherwise; the empty alternative says "or none, when the server allows it".
    for path, operations in paths.items():
        if path not in ("/healthz", "/openapi.json"):
            for operation in operations.values():
                operation["security"] = [{"bearerAuth": []}, {}]
        for operation in operations.values():
            operation["responses"]["405"] = method_not_allowed

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trio_quiccmd server API",
            "version": API_VERSION,
            "description": (
                "Send commands to agents connected over QUIC and follow them to their "
                "result. Errors are {\"error\": {\"code\", \"message\"}}, except the 409 "
                "of POST /api/command (agent offline), which returns the failed command."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token (python -m trio_quiccmd.server api-token create); "
                    "role read for GET endpoints, operate to send and cancel",
                }
            },
        },
    }
