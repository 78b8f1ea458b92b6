"""``python -m trio_quiccmd.server token ...`` and ``... api-token ...``: issue and revoke credentials.

::

    token create CLIENT_ID [--label k=v ...] [--replace]   # an agent's token
    token create --enrollment                               # the enrollment token
    token list
    token revoke CLIENT_ID | --enrollment
    api-token create NAME --role read|operate [--command-type T ...] [--label k=v ...]
    api-token create NAME --replace [--role R] [--command-type T ...] [--label k=v ...]  # keeps what is not given
    api-token list
    api-token revoke NAME

Each takes ``--data-dir DIR`` or ``--config FILE``; by default the data dir is
found as the server finds it (``$QUICCMD_DATA_DIR``, ``data_dir`` in the
``$QUICCMD_CONFIG`` file, ``./.quiccmd``). A new secret is printed once, on stdout, alone on its line;
only its hash is stored. A running server sees the change within a second.

Exit status: 0 done, 1 the operation failed (an unknown name, a token that
already exists, a token file it cannot use), 2 bad arguments (a bad name,
label or command type: nothing is written).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, load_settings
from ..tokens import (
    AGENT_TOKENS_FILE,
    API_TOKENS_FILE,
    ROLES,
    TokenExists,
    TokenFileError,
    issue_agent_token,
    issue_api_token,
    issue_enrollment_token,
    list_agent_tokens,
    list_api_tokens,
    revoke_agent_token,
    revoke_api_token,
    revoke_enrollment_token,
)

PROG = "python -m trio_quiccmd.server"
COMMANDS = ("token", "api-token")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"bad label {text!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Issue, list and revoke agent and API tokens.")
    commands = parser.add_subparsers(dest="command", required=True)

    def data_dir(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data-dir", metavar="DIR",
                         help="the server's data dir (default: as the server finds it: "
                         "$QUICCMD_DATA_DIR, data_dir in --config / $QUICCMD_CONFIG, ./.quiccmd)")
        sub.add_argument("--config", metavar="FILE", help="the server's TOML file, for its data_dir")

    agent = commands.add_parser("token", help="agent tokens (QUIC)")
    agent_actions = agent.add_subparsers(dest="action", required=True)
    create = agent_actions.add_parser("create", help="issue a token for an agent (printed once)")
    create.add_argument("client_id", nargs="?")
    create.add_argument("--enrollment", action="store_true",
                        help="issue the enrollment token instead: it admits agents whose "
                        "client_id has no token of its own")
    create.add_argument("--label", dest="labels", action="append", type=_label, metavar="KEY=VALUE",
                        help="bind this label to the agent (its HELLO's labels are then ignored); "
                        "repeatable; --replace without --label keeps the bound labels")
    create.add_argument("--replace", action="store_true", help="replace an existing token")
    data_dir(create)
    listing = agent_actions.add_parser("list", help="agents with a token (no secrets)")
    data_dir(listing)
    revoke = agent_actions.add_parser("revoke", help="revoke an agent's token (it is disconnected)")
    revoke.add_argument("client_id", nargs="?")
    revoke.add_argument("--enrollment", action="store_true", help="revoke the enrollment token")
    data_dir(revoke)

    api = commands.add_parser("api-token", help="operator tokens (HTTP API)")
    api_actions = api.add_subparsers(dest="action", required=True)
    create = api_actions.add_parser("create", help="issue an API token (printed once)")
    create.add_argument("name")
    create.add_argument("--role", choices=ROLES,
                        help="read: GET endpoints; operate: also send and cancel (required, "
                        "but --replace without --role keeps the token's)")
    create.add_argument("--command-type", dest="command_types", action="append", metavar="TYPE",
                        help="only these command types may be sent/cancelled; repeatable; "
                        "--replace without --command-type keeps the token's")
    create.add_argument("--label", dest="labels", action="append", type=_label, metavar="KEY=VALUE",
                        help="only agents with these labels may be commanded; repeatable; "
                        "--replace without --label keeps the token's")
    create.add_argument("--replace", action="store_true",
                        help="replace an existing token (its role and scope are kept unless given)")
    data_dir(create)
    listing = api_actions.add_parser("list", help="API tokens (no secrets)")
    data_dir(listing)
    revoke = api_actions.add_parser("revoke", help="revoke an API token")
    revoke.add_argument("name")
    data_dir(revoke)
    return parser


def _labels_text(labels: object) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(dict(labels).items())) if labels else "-"  # type: ignore[call-overload]


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        # The same data dir the server would use, found the way it finds it.
        directory = Path(args.data_dir) if args.data_dir else load_settings(
            ["--config", args.config] if args.config else [], os.environ
        ).data_dir
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    # A token written into a data dir no server uses (the command run from
    # the wrong directory) would be refused with no hint why: say where.
    new_directory = args.action == "create" and not directory.exists()
    try:
        if args.command == "token":
            code = _agent_command(parser, args, directory)
        else:
            code = _api_command(parser, args, directory)
        if code == 0 and args.action == "create":
            file = directory / (AGENT_TOKENS_FILE if args.command == "token" else API_TOKENS_FILE)
            print(f"Written to {file}.", file=sys.stderr)
            if new_directory:
                print(f"{PROG}: warning: the data dir {directory} did not exist and was created: "
                      "a server reads tokens from its own data dir (--data-dir, data_dir, "
                      "QUICCMD_DATA_DIR; by default ./.quiccmd where it was started)", file=sys.stderr)
        return code
    except (TokenFileError, TokenExists, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        # What the issue_* functions refuse before writing anything: a bad
        # name, label or command type.
        parser.error(str(exc))


def _agent_command(parser: argparse.ArgumentParser, args: argparse.Namespace, directory: Path) -> int:
    if args.action == "list":
        tokens = list_agent_tokens(directory)
        print("client_id\tlabels\tcreated_at")
        for record in sorted(tokens.agents.values(), key=lambda r: r.client_id):
            print(f"{record.client_id}\t{_labels_text(record.labels)}\t{record.created_at}")
        if tokens.enrollment_hash is not None:
            print(f"(enrollment token)\t-\t{tokens.enrollment_created_at}")
        return 0
    if args.enrollment == bool(args.client_id):
        parser.error(f"token {args.action}: give a CLIENT_ID or --enrollment (one of them)")
    if args.action == "create":
        if args.enrollment:
            if args.labels:
                parser.error("token create --enrollment: labels are bound per agent, not to the enrollment token")
            print(issue_enrollment_token(directory))
            print("Enrollment token created: agents whose client_id has no token may connect with it. "
                  "It is shown once.", file=sys.stderr)
            return 0
        secret = issue_agent_token(
            directory, args.client_id, labels=dict(args.labels) if args.labels else None,
            replace=args.replace,
        )
        print(secret)
        print(f"Token created for {args.client_id}. It is shown once: give it to the agent "
              "(--token-file or QUICCMD_AGENT_TOKEN).", file=sys.stderr)
        return 0
    if args.enrollment:
        if not revoke_enrollment_token(directory):
            print(f"{PROG}: error: there is no enrollment token", file=sys.stderr)
            return 1
        print("Enrollment token revoked.", file=sys.stderr)
        return 0
    try:
        revoke_agent_token(directory, args.client_id)
    except KeyError:
        print(f"{PROG}: error: {args.client_id} has no token", file=sys.stderr)
        return 1
    print(f"Token of {args.client_id} revoked; a connected agent is disconnected.", file=sys.stderr)
    return 0


def _api_command(parser: argparse.ArgumentParser, args: argparse.Namespace, directory: Path) -> int:
    if args.action == "list":
        tokens = list_api_tokens(directory)
        print("name\trole\tcommand_types\tlabels\tcreated_at")
        for record in sorted(tokens.tokens.values(), key=lambda r: r.name):
            types = ",".join(record.command_types) if record.command_types else "-"
            print(f"{record.name}\t{record.role}\t{types}\t{_labels_text(record.labels)}\t{record.created_at}")
        return 0
    if args.action == "create":
        if args.role is None and not args.replace:
            parser.error("api-token create: --role is required (--replace without it keeps the token's role)")
        secret = issue_api_token(
            directory, args.name, role=args.role,
            command_types=args.command_types, labels=dict(args.labels) if args.labels else None,
            replace=args.replace,
        )
        print(secret)
        role = f"role {args.role}" if args.role else "its previous role"
        print(f"API token {args.name} created ({role}). It is shown once: "
              "send it as 'Authorization: Bearer <token>'.", file=sys.stderr)
        return 0
    try:
        revoke_api_token(directory, args.name)
    except KeyError:
        print(f"{PROG}: error: no API token named {args.name}", file=sys.stderr)
        return 1
    print(f"API token {args.name} revoked.", file=sys.stderr)
    return 0
