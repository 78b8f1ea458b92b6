"""Command policy: which command types an agent may be sent, and what their payloads must look like.

Configured in the ``[policy]`` table of the server's TOML file::

    [[policy.allow]]            # agents labelled role=web may get these
    labels = { role = "web" }
    command_types = ["echo", "sysinfo", "restart"]

    [[policy.allow]]            # every agent (no labels to match) may get echo
    command_types = ["echo"]

    [policy.schemas]            # JSON Schema per command type: inline, or a file
    restart = { type = "object", required = ["delay_seconds"] }
    sleep = "schemas/sleep.json"   # relative to the TOML file

Without ``allow`` rules every command type goes to every agent (as before
there was a policy). With rules, a command type goes to an agent only if a
rule whose labels the agent has lists it (``"*"`` lists every type). A
command type with a schema is refused unless its payload validates. A refused
command is never created or sent: :class:`~trio_quiccmd.errors.PolicyDenied`
/ :class:`~trio_quiccmd.errors.InvalidPayload`, HTTP 422.

Schemas are self-contained: a ``$ref`` must point inside the schema (remote
references are never fetched; one that does not resolve stops the start).
``format`` is checked (``ipv4``, ``date-time``, ...). ``uniqueItems`` is
checked in linear time, so no payload makes validation quadratic.

Labels are the server's view of the agent (see ``AgentRegistry.labels_of``):
those bound to its token, else those its HELLO claims.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urljoin

import attrs
import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema

from ..errors import InvalidPayload, PolicyDenied

logger = logging.getLogger("trio_quiccmd.server")

#: The base URI of a policy schema without an ``$id`` of its own.
_SCHEMA_BASE = "urn:trio-quiccmd:policy-schema"


def _registry(schema: Any) -> referencing.Registry:
    """A registry holding ``schema`` (and the resources it embeds) and nothing
    else: no retrieval, so a ``$ref`` to anything outside it is unresolvable,
    never fetched from the network."""
    resource = referencing.Resource.from_contents(
        schema, default_specification=referencing.jsonschema.DRAFT202012
    )
    return referencing.Registry().with_resource(_SCHEMA_BASE, resource).crawl()


def _refs(node: Any, base: str) -> Iterator[tuple[str, str]]:
    """Every (base URI, ``$ref``) in a schema, following ``$id`` changes of base."""
    stack = [(node, base)]
    while stack:
        node, base = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$id"), str):
                base = urljoin(base, node["$id"])
            if isinstance(node.get("$ref"), str):
                yield base, node["$ref"]
            stack.extend((child, base) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, base) for child in node)


def _check_refs(schema: Any, where: str) -> None:
    """Resolve every ``$ref`` now, so a dangling or remote one stops the start."""
    registry = _registry(schema)
    for base, ref in _refs(schema, _SCHEMA_BASE):
        try:
            registry.resolver(base_uri=base).lookup(ref)
        except referencing.exceptions.Unresolvable:
            raise ValueError(
                f"{where}: $ref {ref!r} does not resolve within the schema "
                "(remote references are not fetched)"
            ) from None


def _canonical(value: Any) -> Any:
    """A hashable form of a JSON value; equal exactly when the JSON values are
    (1 and 1.0 equal, true and 1 not, key order ignored)."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, list):
        return ("a", tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("o", frozenset((k, _canonical(v)) for k, v in value.items()))
    return ("z", None)


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[Any]:
    """``uniqueItems`` in linear time. jsonschema's own compares unsortable
    items (objects) pairwise: a 40 KB array of objects took seconds of the
    event loop, enough for one operator to freeze the server."""
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for item in instance:
        key = _canonical(item)
        if key in seen:
            yield jsonschema.ValidationError(f"{instance!r:.200} has non-unique elements")
            return
        seen.add(key)


def _validator(schema: Any) -> Any:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    if "uniqueItems" in cls.VALIDATORS:
        cls = jsonschema.validators.extend(cls, {"uniqueItems": _unique_items})
    # No retrieval (see _registry); formats ("ipv4", "date-time", ...) are checked.
    return cls(schema, registry=_registry(schema), format_checker=cls.FORMAT_CHECKER)


@attrs.frozen
class AllowRule:
    #: The agent must have all of these labels (empty: every agent).
    labels: Mapping[str, str]
    #: Allowed command types; "*" allows any.
    command_types: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels.items())

    def allows(self, command_type: str) -> bool:
        return "*" in self.command_types or command_type in self.command_types


@attrs.frozen
class CommandPolicy:
    """Allow-list rules and payload schemas; the empty policy allows everything."""

    rules: tuple[AllowRule, ...] = ()
    #: command type -> JSON Schema (already checked to be a valid schema).
    schemas: Mapping[str, Any] = attrs.field(factory=dict)
    _validators: dict[str, jsonschema.protocols.Validator] = attrs.field(
        init=False, eq=False, repr=False, factory=dict
    )

    def __attrs_post_init__(self) -> None:
        for command_type, schema in self.schemas.items():
            self._validators[command_type] = _validator(schema)

    @property
    def is_empty(self) -> bool:
        return not self.rules and not self.schemas

    def check(
        self, client_id: str, command_type: str, payload: Any, labels: Mapping[str, str] | None
    ) -> None:
        """Raise PolicyDenied or InvalidPayload if the command may not be sent.

        ``labels`` None (an agent the server knows nothing about) matches only
        rules without labels.
        """
        known = dict(labels or {})
        if self.rules and not any(r.matches(known) and r.allows(command_type) for r in self.rules):
            raise PolicyDenied(client_id, command_type, known)
        validator = self._validators.get(command_type)
        if validator is not None:
            try:
                error = jsonschema.exceptions.best_match(validator.iter_errors(payload))
            except Exception as exc:  # a schema that cannot be applied: refuse, never a 500
                logger.error(
                    "Policy schema could not be applied command_type=%s error=%r", command_type, str(exc)
                )
                raise InvalidPayload(
                    f"payload for {command_type!r} cannot be checked: its schema failed ({exc})"
                ) from None
            if error is not None:
                where = "/".join(str(part) for part in error.absolute_path) or "(the payload)"
                raise InvalidPayload(
                    f"payload for {command_type!r} does not match its schema at {where}: {error.message}"
                )


def parse_policy(table: Any, base_dir: Path) -> CommandPolicy:
    """The ``[policy]`` table of a TOML file in ``base_dir``. Raises ValueError (one line)."""
    if not isinstance(table, dict):
        raise ValueError("'policy' must be a table")
    unknown = set(table) - {"allow", "schemas"}
    if unknown:
        raise ValueError(f"policy: unknown key(s) {', '.join(sorted(unknown))} (known: allow, schemas)")
    rules: list[AllowRule] = []
    raw_rules = table.get("allow", [])
    if not isinstance(raw_rules, list):
        raise ValueError("policy.allow must be an array of tables ([[policy.allow]])")
    for index, raw in enumerate(raw_rules):
        where = f"policy.allow[{index}]"
        if not isinstance(raw, dict) or set(raw) - {"labels", "command_types"}:
            raise ValueError(f"{where} must be a table with labels and command_types")
        labels = raw.get("labels", {})
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ValueError(f"{where}.labels must be a table of strings")
        types = raw.get("command_types")
        if not isinstance(types, list) or not types or not all(isinstance(t, str) and t for t in types):
            raise ValueError(f"{where}.command_types must be a non-empty array of strings")
        rules.append(AllowRule(dict(labels), frozenset(types)))
    raw_schemas = table.get("schemas", {})
    if not isinstance(raw_schemas, dict):
        raise ValueError("policy.schemas must be a table")
    schemas: dict[str, Any] = {}
    for command_type, raw in raw_schemas.items():
        where = f"policy.schemas.{command_type}"
        if isinstance(raw, str):
            path = base_dir / raw
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except OSError as exc:
                raise ValueError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
            except ValueError as exc:
                raise ValueError(f"{where}: {path} is not JSON: {exc}") from None
        if not isinstance(raw, (dict, bool)):
            raise ValueError(f"{where} must be a JSON Schema (a table) or a file name")
        cls = jsonschema.validators.validator_for(raw, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(raw)
        except jsonschema.exceptions.SchemaError as exc:
            raise ValueError(f"{where} is not a valid JSON Schema: {exc.message}") from None
        _check_refs(raw, where)
        schemas[command_type] = raw
    return CommandPolicy(tuple(rules), schemas)
