"""Log lines cannot be forged: whatever a peer puts in a value that is
logged, the line the formatter writes stays one line."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import trio

from trio_quiccmd.logs import KeyValueFormatter, escape_controls
from trio_quiccmd.tokens import issue_api_token

from .test_http_api import TEST_TIMEOUT, running_server

FORGED = "x\n2026-11-28T10:00:00.000Z INFO trio_quiccmd.audit Audit action=send actor=admin"


def test_a_forged_value_yields_one_log_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter())
    logger = logging.getLogger("test_logs.forged")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("Agent rejected client_id=%s reason=%s", FORGED, "a\rb\x1b[2J\x85\u2028c\x7f")
        try:
            raise ValueError("boom\nsecond")
        except ValueError:
            logger.exception("Failed code=%s", "y\r\nINFO fake")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3
    first = lines[0]
    assert first.endswith(
        "Agent rejected client_id='x\\n2026-11-28T10:00:00.000Z INFO trio_quiccmd.audit Audit "
        "action=send actor=admin' reason='a\\rb\\x1b[2J\\x85\\u2028c\\x7f'"
    )
    assert lines[1].endswith("Failed code='y\\r\\nINFO fake'")
    # The traceback is still there, below, every line of it indented.
    assert all(line.startswith("    ") for line in lines[2:])
    assert any("ValueError: boom" in line for line in lines[2:])
    assert escape_controls("plain é text") == "plain é text"


def test_a_value_with_a_space_is_quoted_so_it_cannot_pass_for_more_fields():
    # Found in review: a client_id "x error_code=forged" made the line read
    # as if it had two error codes.
    record = logging.LogRecord(
        "trio_quiccmd.command", logging.ERROR, __file__, 1,
        "Command execution failed command_id=%s client_id=%s labels=%s error_code=%s error=%r",
        ("c1", "x error_code=forged", "role=web,env=prod", "executor_error", "disk full"), None,
    )
    line = KeyValueFormatter().format(record)
    assert line.endswith(
        "Command execution failed command_id=c1 client_id='x error_code=forged' "
        "labels=role=web,env=prod error_code=executor_error error='disk full'"
    )
    # The record is left as it was, for other handlers.
    assert record.args[1] == "x error_code=forged" and type(record.args[1]) is str
    # Only values are quoted (key=%s): not the words a message is made of.
    phrase = logging.LogRecord(
        "trio_quiccmd.server", logging.INFO, __file__, 1, "%s TLS certificate path=%s%s 100%% done",
        ("Created development", Path("/tmp/my certs/c.pem"), " credential=token"), None,
    )
    assert KeyValueFormatter().format(phrase).endswith(
        "Created development TLS certificate path='/tmp/my certs/c.pem' credential=token 100% done"
    )
    # Any value, not only a str (an exception's text); a width from the args counts as one.
    other = logging.LogRecord(
        "trio_quiccmd.agent", logging.WARNING, __file__, 1, "n=%*d failed error=%s",
        (3, 7, ValueError("no answer x=1")), None,
    )
    assert KeyValueFormatter().format(other).endswith("n=  7 failed error='no answer x=1'")


async def test_a_newline_in_a_url_path_stays_in_its_log_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    issue_api_token(tmp_path / "data", "ops", role="operate")
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, require_api_token=True) as h:
            path = "/api/command/x%0A2026-11-28T10:00:00.000Z%20INFO%20trio_quiccmd.audit%20Audit%20action=send"
            assert (await h.request("GET", path)).status == 401
    formatter = KeyValueFormatter()
    text = "\n".join(formatter.format(r) for r in caplog.records)
    lines = text.splitlines()
    rejected = [line for line in lines if "Operator rejected" in line]
    assert len(rejected) == 1 and "path='/api/command/x\\n2026" in rejected[0]
    assert not any(line.startswith("2026-11-28T10:00:00.000Z") for line in lines)


async def test_a_url_path_cannot_forge_the_access_logs_fields_or_flood_it(tmp_path, caplog):
    # Found in review: hypercorn passes the access log's values as a mapping,
    # which the quoting did not look at: a path "abc%20status=200" logged a
    # status=200 for a 401. And a 60,000-character path went whole into two
    # log lines per request.
    caplog.set_level(logging.INFO)
    issue_api_token(tmp_path / "data", "ops", role="operate")
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tmp_path, require_api_token=True) as h:
            assert (await h.request("GET", "/api/command/abc%20status=200%20bytes=0")).status == 401
            assert (await h.request("GET", "/api/command/" + "D" * 60_000)).status == 401
    formatter = KeyValueFormatter()
    access = [formatter.format(r) for r in caplog.records if r.name == "trio_quiccmd.http.access"]
    forged = [line for line in access if "abc" in line]
    assert forged and all("path='/api/command/abc status=200 bytes=0' " in line for line in forged)
    after_the_path = [line.split("bytes=0' ", 1)[1] for line in forged]
    # (hypercorn may log the request a first time with status=-, see docs/command-system.md.)
    assert all("status=200" not in rest for rest in after_the_path), after_the_path
    assert any("status=401" in rest for rest in after_the_path), after_the_path
    lines = [formatter.format(r) for r in caplog.records]
    long_ones = [line for line in lines if "DDDD" in line]
    assert long_ones and all(len(line) < 1_500 and "(60013 characters in all)" in line for line in long_ones)


async def test_a_label_value_cannot_pass_for_more_labels_in_the_log(caplog):
    # Found in review: --label "zone=eu,role=web" was logged
    # labels=role=web,zone=eu,role=web, as if the agent had role=web twice.
    from trio_quiccmd import CommandManager
    from trio_quiccmd.wire import Hello

    from .recording import RecordingSession

    caplog.set_level(logging.INFO, logger="trio_quiccmd.server")
    manager = CommandManager()
    link = manager.registry.new_link()
    session = RecordingSession()
    link.handshake_completed(session)
    link.frame_received(session, 0, Hello(client_id="b1", labels={"zone": "eu,role=web", "role": "db"}))
    [connected] = [r.getMessage() for r in caplog.records if "Agent connected" in r.getMessage()]
    assert connected.endswith("labels=role=db,zone='eu,role=web'")
