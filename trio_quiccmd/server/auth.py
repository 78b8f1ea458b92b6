"""Who may connect as an agent, and who may use the HTTP API.

:class:`AgentAuthenticator` checks the credential in an agent's HELLO, before
the connection is welcomed or registered; :class:`ApiAuthenticator` checks an
operator's bearer token and what it may do. Both read their token files from
the data dir (see :mod:`trio_quiccmd.tokens`) and notice changes to them.
docs/security.md says what each one stops and what it does not.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Mapping

import attrs

from ..errors import Forbidden, Unauthorized
from ..tokens import (
    AGENT_TOKENS_FILE,
    API_TOKENS_FILE,
    AgentTokens,
    ApiTokens,
    WatchedFile,
    ensure_dev_agent_token,
    hashes_equal,
    load_agent_tokens,
    load_api_tokens,
    token_hash,
)

logger = logging.getLogger("trio_quiccmd.server")

#: Most bytes of a credential looked at; longer is refused without hashing it.
MAX_TOKEN_LENGTH = 512


class AgentAuthFailed(Exception):
    """The agent's credential was refused. ``str()`` is the reason sent to it."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        #: For the server's log only (e.g. whose token it really was).
        self.detail = detail


@attrs.frozen
class AgentIdentity:
    """How an agent proved its client_id, and the labels the server asserts for it."""

    #: "token" (its own), "enrollment" or "development".
    credential: str
    #: None: its HELLO's labels stand (self-declared).
    labels: Mapping[str, str] | None
    #: The presented token's hash, to check it again after a token file change.
    presented_hash: str


class AgentAuthenticator:
    """Checks HELLO credentials against ``<data_dir>/agent_tokens.json``.

    A HELLO for ``client_id`` is admitted with:

    * that client_id's own token (a token issued for client-001 is refused in
      a HELLO for client-002);
    * the enrollment token, if one is set, for a client_id that has no token
      of its own (the agent is admitted; it is not issued a token);
    * the development credential (``dev_token``), for any client_id, but only
      while no agent token and no enrollment token exist: issuing the first
      one turns the development credential off.

    Anything else raises :class:`AgentAuthFailed`.
    """

    def __init__(self, tokens: WatchedFile[AgentTokens], *, dev_token: str | None = None):
        self._tokens = tokens
        self._dev_hash = token_hash(dev_token) if dev_token else None
        self._configured = tokens.value.configured

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> "AgentAuthenticator":
        """Load the token file and write the development credential (kept if
        it exists). Blocking file I/O; raises TokenFileError or OSError."""
        tokens = WatchedFile(data_dir / AGENT_TOKENS_FILE, load_agent_tokens)
        path, dev_token, created = ensure_dev_agent_token(data_dir)
        if tokens.value.configured:
            logger.info(
                "Agent authentication mode=tokens agents=%d enrollment=%s "
                "(the development credential is not accepted)",
                len(tokens.value.agents), tokens.value.enrollment_hash is not None,
            )
        else:
            logger.info(
                "Agent authentication mode=development credential=%s created=%s "
                "(any client_id; issue agent tokens to turn it off)",
                path, created,
            )
        return cls(tokens, dev_token=dev_token)

    @property
    def tokens(self) -> AgentTokens:
        return self._tokens.value

    @property
    def generation(self) -> int:
        """Changes whenever the token file was reloaded (by anyone)."""
        return self._tokens.generation

    def refresh(self) -> None:
        """Re-read the token file if it changed."""
        if self._tokens.refresh():
            self._note_mode()

    def _note_mode(self) -> None:
        """Say so when a change of the token file switched the authentication mode."""
        configured = self._tokens.value.configured
        if configured == self._configured:
            return
        self._configured = configured
        if configured:
            logger.warning(
                "Agent authentication mode changed mode=tokens (agent tokens exist; the "
                "development credential is no longer accepted)"
            )
        elif self._dev_hash is not None:
            logger.warning(
                "Agent authentication mode changed mode=development (the last agent and enrollment "
                "token are gone: ANY client_id holding the development credential is admitted "
                "again; issue a token to turn it off)"
            )
        else:
            logger.warning("Agent authentication mode changed mode=none (no agent token is left)")

    def authenticate(self, client_id: str, token: str | None) -> AgentIdentity:
        """The identity ``token`` proves for ``client_id``; raises AgentAuthFailed."""
        self.refresh()  # a stat: a token created a moment ago works at once
        if not token:
            raise AgentAuthFailed("no token presented")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AgentAuthFailed("invalid token")
        return self.check(client_id, token_hash(token))

    def check(self, client_id: str, presented_hash: str) -> AgentIdentity:
        """As :meth:`authenticate`, from the token's hash (without re-reading the file)."""
        tokens = self._tokens.value
        record = tokens.agents.get(client_id)
        if record is not None:
            if hashes_equal(record.hash, presented_hash):
                return AgentIdentity("token", record.labels, presented_hash)
            owner = tokens.owner_of(presented_hash)
            raise AgentAuthFailed(
                f"invalid token for client_id {client_id}",
                f"token_of={owner}" if owner else "",
            )
        if tokens.enrollment_hash is not None and hashes_equal(tokens.enrollment_hash, presented_hash):
            return AgentIdentity("enrollment", None, presented_hash)
        if self._dev_hash is not None and hashes_equal(self._dev_hash, presented_hash):
            if tokens.configured:
                raise AgentAuthFailed(
                    "the development credential is not accepted: this server has agent tokens"
                )
            return AgentIdentity("development", None, presented_hash)
        owner = tokens.owner_of(presented_hash)
        raise AgentAuthFailed(
            f"invalid token for client_id {client_id}", f"token_of={owner}" if owner else ""
        )

    def labels_of(self, client_id: str) -> Mapping[str, str] | None:
        """The labels bound to ``client_id``'s token, if it has any."""
        record = self._tokens.value.agents.get(client_id)
        return record.labels if record is not None else None


# -- operators ---------------------------------------------------------------------------------


@attrs.frozen
class Principal:
    """Who is calling the HTTP API, and what they may do."""

    name: str
    role: str
    command_types: tuple[str, ...] | None = None
    labels: Mapping[str, str] | None = None


#: A request without a token where none is required: today's behaviour, all of it.
ANONYMOUS = Principal("anonymous", "operate")

_ROLE_RANK = {"read": 1, "operate": 2}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiAuthenticator:
    """Bearer tokens for the HTTP API, from ``<data_dir>/api_tokens.json``.

    With ``required`` false a request without ``Authorization`` is
    :data:`ANONYMOUS`; a request with one is checked either way, so a wrong
    token is always a 401, never silently anonymous.
    """

    def __init__(
        self, tokens: WatchedFile[ApiTokens], *, required: bool, required_once_tokens_exist: bool = False
    ):
        self._tokens = tokens
        self.required = required
        #: Off loopback with ``allow_unauthenticated_http``: open only until the
        #: first API token exists (checked at every request).
        self.required_once_tokens_exist = required_once_tokens_exist

    @classmethod
    def from_data_dir(
        cls, data_dir: Path, *, required: bool, required_once_tokens_exist: bool = False
    ) -> "ApiAuthenticator":
        return cls(
            WatchedFile(data_dir / API_TOKENS_FILE, load_api_tokens),
            required=required,
            required_once_tokens_exist=required_once_tokens_exist,
        )

    @property
    def tokens(self) -> ApiTokens:
        return self._tokens.value

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller named by an ``Authorization`` header; raises Unauthorized."""
        if authorization is None or not authorization.strip():
            if self.required:
                raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
            if self.required_once_tokens_exist:
                self._tokens.refresh()
                if self._tokens.value.tokens:
                    raise Unauthorized(
                        "a bearer token is required (Authorization: Bearer <token>): the API "
                        "is not on loopback and API tokens exist"
                    )
            return ANONYMOUS
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("invalid bearer token")
        self._tokens.refresh()
        record = self._tokens.value.find(token_hash(token))
        if record is None:
            raise Unauthorized("invalid bearer token")
        return Principal(record.name, record.role, record.command_types, record.labels)

    @staticmethod
    def require_role(principal: Principal, role: str, what: str) -> None:
        """Raises Forbidden unless ``principal`` has ``role`` (operate includes read)."""
        if _ROLE_RANK[principal.role] < _ROLE_RANK[role]:
            raise Forbidden(
                f"token {principal.name} has role {principal.role}; {what} needs role {role}"
            )

    @staticmethod
    def require_scope(
        principal: Principal,
        client_id: str,
        command_type: str,
        agent_labels: Mapping[str, str] | None,
    ) -> None:
        """Raises Forbidden unless ``principal`` may command ``client_id`` with ``command_type``."""
        if principal.command_types is not None and command_type not in principal.command_types:
            raise Forbidden(
                f"token {principal.name} may not use command type {command_type!r} "
                f"(allowed: {', '.join(principal.command_types)})"
            )
        if principal.labels:
            wanted = ",".join(f"{k}={v}" for k, v in sorted(principal.labels.items()))
            if agent_labels is None:
                raise Forbidden(
                    f"token {principal.name} may only command agents labelled {wanted}, and "
                    f"agent {client_id}'s labels are unknown (not connected, none bound to its token)"
                )
            if any(agent_labels.get(k) != v for k, v in principal.labels.items()):
                raise Forbidden(
                    f"token {principal.name} may only command agents labelled {wanted}; "
                    f"agent {client_id} is not"
                )


def check_http_exposure(
    http_host: str, api: ApiAuthenticator, *, allow_unauthenticated: bool
) -> str | None:
    """Why the HTTP API must not start with these settings, or None.

    Off loopback a token is always required, so there must be one to give;
    with ``require_api_token`` on loopback, likewise.
    """
    if api.tokens.tokens:
        return None
    if not is_loopback(http_host) and not allow_unauthenticated:
        return (
            f"the HTTP API would listen on {http_host}, which is not loopback, and no API "
            "token exists: create one (python -m trio_quiccmd.server api-token create NAME "
            "--role operate) or pass --allow-unauthenticated-http"
        )
    if api.required:
        return (
            "require_api_token is set but no API token exists: create one "
            "(python -m trio_quiccmd.server api-token create NAME --role operate)"
        )
    return None


__all__ = [
    "ANONYMOUS",
    "AgentAuthFailed",
    "AgentAuthenticator",
    "AgentIdentity",
    "ApiAuthenticator",
    "Principal",
    "check_http_exposure",
    "is_loopback",
]
